"""Schedule-Free with BatchNorm: before each evaluation the BatchNorm statistics are recomputed at the
averaged weights x, as its authors prescribe (schedulefree README, "Caveats"), on the CIFAR ResNet-18.

Real parts at tiny sizes: timm's ResNet-18 on 64 digits (4 steps an epoch), the real AdamWScheduleFree,
the real loop and `run_experiment`.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import optbench.experiment as experiment
from optbench.data import load_dataset, train_batches
from optbench.experiment import batchnorm_warmup, run_experiment
from optbench.models import build_model
from optbench.optimizers import BuildContext, get_entry
from optbench.records import load_records
from optbench.train import autocast_for, evaluate, train

from conftest import tiny_config

AMP = autocast_for(torch.device("cpu"), "fp32")
RESNET = dict(model="resnet18_cifar", dataset="digits", depth=None, subset=64, test_subset=40, batch_size=16,
              memory_probe=False)


class _Quiet:
    def epoch_start(self, epoch, epochs, steps): pass
    def progress(self, steps_done_in_epoch, loss, images_per_s): pass
    def log_point(self, step, values): pass
    def epoch_end(self, row): pass
    def phase(self, text): pass
    def warn(self, text): pass


@pytest.fixture(scope="module")
def digits64():
    return load_dataset("digits", subset=64, test_subset=40)


def _running_stats(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def _params(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _readme_procedure(model, data) -> None:
    """The README's lines, written out here independently of optbench's function."""
    model.train()
    with torch.no_grad():
        for x, _ in itertools.islice(train_batches(data, 16, 0, 1, False), 50):
            model(x)
    model.eval()


def _one_epoch(data, warm_up: bool):
    entry = get_entry("schedulefree")
    model = build_model("resnet18_cifar", data.spec, 0)
    opt = entry.make(model, entry.defaults(), BuildContext("cpu", total_steps=4, warmup_steps=0)).optimizer
    hook = (lambda epoch: batchnorm_warmup(model, itertools.islice(train_batches(data, 16, 0, epoch, False), 50),
                                           AMP)) if warm_up else None
    result = train(model, opt, entry, None, data, epochs=1, batch_size=16, eval_batch_size=64, seed=0,
                   augment=False, precision="fp32", log_every=5, reporter=_Quiet(), before_eval=hook)
    assert result.status == "ok"
    return model, opt, result


def test_evaluation_uses_bn_statistics_recomputed_at_the_averaged_weights(digits64):
    warmed, _, warmed_result = _one_epoch(digits64, warm_up=True)
    plain, plain_opt, plain_result = _one_epoch(digits64, warm_up=False)
    # The warm-up moves no weight: both runs end holding the same averaged weights x...
    warmed_params, plain_params = _params(warmed), _params(plain)
    assert all(torch.equal(warmed_params[k], plain_params[k]) for k in plain_params)
    # ...but not the same BatchNorm statistics, nor the same test loss.
    warmed_stats, training_stats = _running_stats(warmed), _running_stats(plain)
    assert any(not torch.allclose(warmed_stats[k], training_stats[k]) for k in training_stats)
    assert warmed_result.history[-1]["test_loss"] != plain_result.history[-1]["test_loss"]

    # The README's procedure, by hand, on the run without the warm-up (x in place): the same statistics,
    # and evaluating with them gives the loss the warmed run recorded.
    _readme_procedure(plain, digits64)
    by_hand = _running_stats(plain)
    assert all(torch.equal(by_hand[k], warmed_stats[k]) for k in by_hand)
    test_loss, _ = evaluate(plain, digits64, 64, AMP)
    assert test_loss == pytest.approx(warmed_result.history[-1]["test_loss"], rel=1e-6)

    # At the gradient points y instead (optimizer in train mode), the same procedure gives other statistics:
    # the warm-up ran at x.
    plain.load_state_dict({**plain.state_dict(), **training_stats})
    plain_opt.train()
    assert any(not torch.equal(p, plain_params[k]) for k, p in plain.named_parameters())
    _readme_procedure(plain, digits64)
    at_y = _running_stats(plain)
    assert any(not torch.allclose(at_y[k], warmed_stats[k]) for k in at_y if "running_mean" in k)


def test_the_warm_up_changes_only_batchnorm_buffers_and_no_random_stream():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.randn(2, 1, 8, 8))  # materialise the lazy layer
    params, stats = _params(model), _running_stats(model)
    batches = [(torch.randn(5, 1, 8, 8), None) for _ in range(3)]
    rng = torch.get_rng_state()
    assert batchnorm_warmup(model, iter(batches), AMP) == 3
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew in train mode; the run's stream is restored
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, params[k]) for k, p in model.named_parameters())
    assert not torch.allclose(_running_stats(model)["1.running_mean"], stats["1.running_mean"])


class _StopAtEpoch(_Quiet):
    """Ctrl-C as epoch `epoch` ends: the run keeps the checkpoint of the epoch before."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def epoch_end(self, row):
        if row["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_runs_recompute_only_for_schedulefree_and_resume_exactly(tmp_path, digits64, monkeypatch):
    calls = []
    real = experiment.batchnorm_warmup
    monkeypatch.setattr(experiment, "batchnorm_warmup", lambda *a: calls.append(real(*a)) or calls[-1])

    whole, _ = run_experiment(tiny_config("schedulefree", tmp_path / "whole", epochs=2, **RESNET), _Quiet(),
                              data=digits64)
    assert whole["status"] == "ok" and whole["bn_warmup_batches"] == 4 and calls == [4, 4]  # every evaluation

    adamw, _ = run_experiment(tiny_config("adamw", tmp_path / "whole", epochs=1, **RESNET), _Quiet(), data=digits64)
    assert adamw["bn_warmup_batches"] is None and calls == [4, 4]  # evaluates the weights it trains: no warm-up
    vit, _ = run_experiment(tiny_config("schedulefree", tmp_path / "vit", epochs=1), _Quiet())
    assert vit["bn_warmup_batches"] is None  # no BatchNorm in a ViT

    config = tiny_config("schedulefree", tmp_path / "stopped", epochs=2, **RESNET)
    stopped, _ = run_experiment(config, _StopAtEpoch(2), data=digits64)
    assert stopped["status"] == "interrupted"
    resumed, _ = run_experiment(config, _Quiet(), data=digits64, resume=True)
    assert resumed["status"] == "ok" and resumed["resumed"] is True
    # Weights and BatchNorm buffers, bit for bit: the warm-up moved no random stream and no weight.
    assert resumed["final_weights_sha256"] == whole["final_weights_sha256"]
    assert [r["test_loss"] for r in resumed["history"]] == [r["test_loss"] for r in whole["history"]]
    assert len(load_records(tmp_path / "stopped").records) == 2
