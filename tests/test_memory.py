"""`optbench memory`: state bytes, estimate vs measurement, Sophia's Hessian step, Lion's verdict, CLI errors.

The estimate (MemTracker under FakeTensorMode) and the CPU measurement (MemTracker on real tensors) run
the same training step, so on the same model they must agree: optimizer state exactly, every other part
within ACTIVATION_TOLERANCE. State bytes are checked three ways: what the optimizer's own state tensors
hold after a real step (sum of nbytes), what the report says, and what the parameter shapes imply under
each optimizer's known layout (the registry's state_layout).

Sizes: ViT-Tiny at 32px / patch 4 (65 tokens) for estimate vs measurement; ViT-Base (86M parameters, 16x
ViT-Tiny) at 16px / patch 8 and batch 1 for the large-model state check, where a real step stays cheap.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from optbench.cli import app
from optbench.memory import measure_memory, resolve_spec
from optbench.models import default_patch_size
from optbench.optimizers import BuildContext, get_entry
from optbench.train import training_step

OPTIMIZERS = ("adamw", "lion", "sophia", "schedulefree")
TINY = dict(model="vit_tiny_patch16_224", image_size=32, patch_size=4, num_classes=10)
# Estimate and measurement ran identical numbers on torch 2.14; 2% leaves room for kernels whose fake
# (meta) outputs are sized differently from the real ones.
ACTIVATION_TOLERANCE = 0.02
PARTS = ("params", "grads", "optimizer_state", "activations", "backward_temporaries", "step_temporaries", "inputs")


def meta_model(spec_kwargs: dict = TINY) -> torch.nn.Module:
    """The model on the meta device: shapes and dtypes, no memory."""
    import timm

    with torch.device("meta"):
        return timm.create_model(spec_kwargs["model"], pretrained=False, img_size=spec_kwargs["image_size"],
                                 patch_size=spec_kwargs["patch_size"], num_classes=spec_kwargs["num_classes"])


def real_state_nbytes(spec_kwargs: dict, batch: int, names=OPTIMIZERS, adamw_impl: str = "foreach") -> dict[str, int]:
    """Sum of nbytes over the tensors in each optimizer's own state after one real training step."""
    import timm

    torch.manual_seed(0)
    kwargs = {k: v for k, v in spec_kwargs.items() if k != "model"}
    model = timm.create_model(spec_kwargs["model"], pretrained=False, img_size=kwargs.pop("image_size"), **kwargs)
    x = torch.randn(batch, 3, spec_kwargs["image_size"], spec_kwargs["image_size"])
    y = torch.randint(0, spec_kwargs["num_classes"], (batch,))
    out = {}
    for name in names:
        entry = get_entry(name)
        hparams = entry.defaults()
        if name == "adamw":
            hparams["implementation"] = adamw_impl
        opt = entry.make(model, hparams, BuildContext("cpu", 100, 0)).optimizer
        entry.train_mode(opt)
        training_step(model, opt, entry, x, y, torch.autocast("cpu", enabled=False), entry.hessian_due(opt))
        out[name] = sum(v.nbytes for state in opt.state.values() for v in state.values() if torch.is_tensor(v))
        del opt
    return out


@pytest.fixture(scope="module")
def tiny_reports():
    """ViT-Tiny, batch 4, all four optimizers, foreach AdamW: estimated and measured on the CPU."""
    out = {}
    for method in ("estimate", "tracked"):
        spec = resolve_spec(batch_size=4, method=method, adamw_impl="foreach", **TINY)
        out[method] = measure_memory(spec, with_verdict=False)
    return out


# --- state bytes -----------------------------------------------------------------------------------


def test_state_bytes_are_what_the_optimizers_own_state_tensors_hold_vit_tiny(tiny_reports):
    real = real_state_nbytes(TINY, batch=2)
    model = meta_model()
    for name in OPTIMIZERS:
        for method, report in tiny_reports.items():
            result = report.result(name)
            assert result.state_bytes == real[name], (name, method)
            assert result.state_layout_bytes == real[name] == get_entry(name).state_layout_bytes(model), (name, method)
            for step in result.steps:  # what MemTracker booked as state when step() started
                assert step.optimizer_state == real[name], (name, method, step.kind)


def test_state_bytes_for_a_model_sixteen_times_larger():
    """ViT-Base (86M parameters): the estimate's state equals the shape-derived layout for all four, and a
    real step for AdamW, Lion and Schedule-Free. Sophia's real step is left out: its Hessian step (the
    first) costs ~7 s on one core at this size; its real state is checked on ViT-Tiny."""
    base = dict(model="vit_base_patch16_224", image_size=16, patch_size=8, num_classes=10)
    spec = resolve_spec(batch_size=1, method="estimate", **base)
    assert spec.param_count > 10 * 5_380_000
    report = measure_memory(spec, with_verdict=False)
    real = real_state_nbytes(base, batch=1, names=("adamw", "lion", "schedulefree"))
    param_bytes = 4 * spec.param_count
    model = meta_model(base)
    n_tensors = len(list(model.parameters()))
    for name in OPTIMIZERS:
        result = report.result(name)
        assert result.state_bytes == result.state_layout_bytes == real.get(name, result.state_bytes), name
        # The layout in words: k fp32 tensors per parameter, + AdamW's float32 `step` per parameter tensor.
        (group,) = get_entry(name).group_params(model)
        per_param, scalars = group.layout.per_param, group.layout.scalars
        assert result.state_bytes == len(per_param) * param_bytes + scalars * 4 * n_tensors, name
        assert result.param_bytes == param_bytes
        plain = result.steps[0]
        assert plain.params == param_bytes and plain.optimizer_state == result.state_bytes, name


def test_lion_state_is_half_of_adamw(tiny_reports):
    for report in tiny_reports.values():
        adamw, lion = report.result("adamw"), report.result("lion")
        n_tensors = len(list(meta_model().parameters()))  # AdamW keeps one float32 `step` scalar per parameter tensor
        assert 2 * lion.state_bytes == adamw.state_bytes - 4 * n_tensors
        assert lion.state_saving_vs_adamw == pytest.approx(0.5, abs=1e-4)


# --- estimate vs measurement, and what a step holds ------------------------------------------------


def test_estimate_agrees_with_tracked_measurement(tiny_reports):
    estimate, tracked = tiny_reports["estimate"], tiny_reports["tracked"]
    assert estimate.spec.method == "estimate" and tracked.spec.method == "tracked"
    for name in OPTIMIZERS:
        est, real = estimate.result(name), tracked.result(name)
        assert est.state_bytes == real.state_bytes, name
        assert [s.kind for s in est.steps] == [s.kind for s in real.steps]
        for e, r in zip(est.steps, real.steps):
            assert e.optimizer_state == r.optimizer_state, (name, e.kind)
            assert e.peak_phase == r.peak_phase, (name, e.kind)
            for part in ("peak_bytes", "activations", "backward_temporaries", "step_temporaries",
                         "forward_backward_peak_bytes", "step_peak_bytes"):
                assert getattr(e, part) == pytest.approx(getattr(r, part), rel=ACTIVATION_TOLERANCE, abs=4096), \
                    (name, e.kind, part)


def test_parts_add_up_to_the_peak_and_foreach_adamw_allocates_its_weights_in_step(tiny_reports):
    for report in tiny_reports.values():
        for result in report.results:
            for step in result.steps:
                assert sum(getattr(step, p) for p in PARTS) == step.peak_bytes, (result.optimizer, step.kind)
        adamw = report.result("adamw")
        # torch's foreach AdamW builds ~1x the weights of temporaries inside step() (REFERENCE.md).
        assert adamw.steps[0].step_own_temporaries == pytest.approx(adamw.param_bytes, rel=0.05)


def test_sophia_peak_is_set_by_its_hessian_step(tiny_reports):
    for report in tiny_reports.values():
        sophia = report.result("sophia")
        plain, hessian = sophia.steps
        assert (plain.kind, hessian.kind) == ("plain", "hessian")
        assert hessian.peak_bytes > plain.peak_bytes
        assert sophia.peak_bytes == hessian.peak_bytes
        assert all(len(report.result(n).steps) == 1 for n in ("adamw", "lion", "schedulefree"))


# --- Lion's verdict --------------------------------------------------------------------------------


def test_lion_cannot_reach_30_percent_against_fused_adamw_and_the_bound_is_25_percent():
    spec = resolve_spec(batch_size=64, method="estimate", adamw_impl="fused", optimizers=["lion"], depth=2, **TINY)
    verdict = measure_memory(spec).verdict
    assert not verdict.reached and verdict.batch_size is None
    sizes = [p.batch_size for p in verdict.points]
    assert sizes[0] == 64 and sizes[-1] == 1  # measured at the requested batch and at batch 1
    assert all(p.saving < 0.30 for p in verdict.points)
    assert verdict.points[-1].saving > verdict.points[0].saving  # activations shrink the saving
    assert verdict.bound_without_temporaries == pytest.approx(0.25, abs=0.002)
    assert verdict.bytes_per_param_adamw == pytest.approx(16, abs=0.1)
    assert verdict.bytes_per_param_lion == pytest.approx(12, abs=0.1)
    assert "cannot reach 30%" in verdict.message and f"{verdict.bound_without_temporaries:.1%}" in verdict.message


def test_lion_reaches_30_percent_against_foreach_adamw_only_at_small_batches():
    spec = resolve_spec(batch_size=64, method="estimate", adamw_impl="foreach", optimizers=["lion"], depth=2, **TINY)
    verdict = measure_memory(spec).verdict
    assert verdict.reached and verdict.batch_size is not None and verdict.batch_size < 64
    by_batch = {p.batch_size: p.saving for p in verdict.points}
    assert by_batch[verdict.batch_size] >= 0.30
    larger = min(b for b in by_batch if b > verdict.batch_size)  # the boundary was measured on both sides
    assert by_batch[larger] < 0.30
    assert "foreach" in verdict.message and "temporaries" in verdict.message


# --- inputs and the command ------------------------------------------------------------------------


def test_default_patch_keeps_a_sensible_grid():
    assert default_patch_size("vit_tiny_patch16_224", 32) == 4
    assert default_patch_size("vit_tiny_patch16_224", 224) == 16
    assert default_patch_size("vit_base_patch16_224", 64) == 8
    assert default_patch_size("vit_large_patch14_clip_224", 224) == 14


@pytest.mark.parametrize("args, words", [
    (["--model", "vit_nonexistent_patch16_224", "--batch-size", "8"], "unknown model 'vit_nonexistent_patch16_224'"),
    (["--model", "resnet50", "--batch-size", "8"], "any timm ViT name"),  # timm has it; the registry does not
    (["--model", "vit_tiny_patch16_224", "--batch-size", "0"], "batch size"),
    (["--model", "vit_tiny_patch16_224", "--batch-size", "-3"], "batch size"),
    (["--model", "vit_tiny_patch16_224", "--batch-size", "8", "--optimizers", "adamw,adagrad"], "adagrad"),
    (["--model", "vit_tiny_patch16_224", "--batch-size", "8", "--precision", "fp8"], "precision"),
    (["--model", "vit_tiny_patch16_224", "--batch-size", "8", "--adamw-impl", "turbo"], "AdamW implementation"),
    (["--model", "vit_tiny_patch16_224", "--batch-size", "8", "--image-size", "30", "--patch-size", "4"], "divide"),
    (["--model", "vit_tiny_patch16_224", "--batch-size", "8", "--json", "/nonexistent/memory.json"], "cannot write"),
])
def test_bad_input_is_one_clear_line(args, words):
    result = CliRunner().invoke(app, ["memory", *args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_method_cuda_without_a_gpu_is_one_clear_line():
    result = CliRunner().invoke(app, ["memory", "--model", "vit_tiny_patch16_224", "--batch-size", "8",
                                      "--method", "cuda"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--method cuda needs a CUDA GPU" in lines[0], result.output


def test_command_prints_the_table_and_verdict_and_writes_json(tmp_path):
    path = tmp_path / "memory.json"
    result = CliRunner().invoke(app, ["memory", "--model", "vit_tiny_patch16_224", "--batch-size", "1",
                                      "--image-size", "32", "--num-classes", "10", "--method", "estimate",
                                      "--optimizers", "adamw,lion", "--json", str(path)])
    assert result.exit_code == 0, result.output
    for text in ("Training-step memory", "AdamW", "Lion", "Optimizer state", "step() temporaries",
                 "Peak vs AdamW", "estimated, nothing allocated", "Lion's peak saving vs AdamW (foreach)"):
        assert text in result.output, text
    data = json.loads(path.read_text())
    assert data["spec"]["method"] == "estimate" and data["spec"]["adamw_impl"] == "foreach"
    assert [r["optimizer"] for r in data["results"]] == ["adamw", "lion"]
    assert data["results"][0]["implementation"]["code_path"] == "foreach"
    assert data["verdict"]["points"][0]["batch_size"] == 1
    assert data["results"][1]["state_bytes"] * 2 < data["results"][0]["state_bytes"]
