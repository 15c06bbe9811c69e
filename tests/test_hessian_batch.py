"""Sophia's `hessian_batch`: the Hutchinson estimate on the first N images, passed to SophiaH.

Real timm ViT (depth 1), real SophiaH, the real training step. The probe vector is drawn from the global
RNG in the library's order, so seeding before each path makes both draw the same z.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from optbench.errors import ConfigError
from optbench.hutchinson import hutchinson_diagonal
from optbench.optimizers import get_entry
from optbench.train import training_step
from tests.test_optimizers import CPU, hparams, tiny_vit

AMP = nullcontext()


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def sub_batch_estimate(model, x, y, n):
    params = list(model.parameters())
    torch.manual_seed(7)
    return hutchinson_diagonal(model, params, x[:n], y[:n], AMP, "rademacher")


def test_whole_batch_estimate_equals_sophias_own_with_the_same_probe_vector():
    entry = get_entry("sophia")
    model = tiny_vit()
    x, y = batch()
    own = copy.deepcopy(model)
    opt = entry.make(own, hparams("sophia"), CPU).optimizer
    assert entry.hessian_due(opt)
    torch.manual_seed(7)
    training_step(own, opt, entry, x, y, AMP, hessian=True)  # today's path: SophiaH estimates itself
    theirs = [opt.state[p]["hessian"] for p in own.parameters()]
    ours = sub_batch_estimate(model, x, y, x.shape[0])
    assert sum(int(torch.count_nonzero(t)) for t in theirs) > 0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_sub_batch_estimate_uses_only_the_first_n_images():
    model = tiny_vit()
    x, y = batch()
    base = sub_batch_estimate(model, x, y, 2)
    later = x.clone()
    later[2:] = torch.randn_like(later[2:])  # images beyond N changed: same estimate
    for a, b in zip(base, sub_batch_estimate(model, later, y, 2)):
        assert torch.equal(a, b)
    within = x.clone()
    within[1] = torch.randn_like(within[1])  # one image within N changed: another estimate
    assert any(not torch.allclose(a, b) for a, b in zip(base, sub_batch_estimate(model, within, y, 2)))


def test_hessian_batch_step_passes_the_sub_batch_estimate_and_keeps_cadence_and_count():
    entry = get_entry("sophia")
    model = tiny_vit()
    x, y = batch()
    reference = sub_batch_estimate(copy.deepcopy(model), x, y, 2)
    opt = entry.make(model, hparams("sophia", hessian_batch=2, update_period=3), CPU).optimizer
    assert opt.hessian_batch == 2
    own_estimates = []
    opt.compute_hutchinson_hessian = lambda *a, **k: own_estimates.append(1)  # must never run
    due = []
    for step in range(7):
        hessian = entry.hessian_due(opt)
        due.append(hessian)
        if step == 0:
            torch.manual_seed(7)
        training_step(model, opt, entry, x, y, AMP, hessian)
        if step == 0:
            for p, r in zip(model.parameters(), reference):
                assert torch.equal(opt.state[p]["hessian"], r)
        assert all(p.grad is None for p in model.parameters())
    assert due == [True, False, False, True, False, False, True]
    assert own_estimates == [] and entry.hessian_estimates(opt) == 3


def test_hessian_batch_at_least_the_batch_is_sophias_own_full_batch_path():
    entry = get_entry("sophia")
    model = tiny_vit()
    opt = entry.make(model, hparams("sophia", hessian_batch=8), CPU).optimizer
    x, y = batch(8)
    assert entry.hessian_estimate(model, opt, x, y, AMP) is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_hessian_batch_must_be_a_positive_whole_number(bad):
    with pytest.raises(ConfigError, match="hessian_batch"):
        get_entry("sophia").make(tiny_vit(), hparams("sophia", hessian_batch=bad), CPU)
