"""The optimizer registry and the library traps it handles, checked on the real libraries.

Weight-decay checks use a zero gradient: then the only change one step makes is the decay itself, so
the factor the weights are multiplied by can be compared exactly (bit for bit).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from optbench.config import resolve_config
from optbench.data import SPECS, train_batches
from optbench.errors import ConfigError
from optbench.measure import optimizer_state_bytes
from optbench.models import build_model
from optbench.optimizers import BASELINE, COURSE_SET, REGISTRY, BuildContext, RunSettings, get_entry, title_of
from optbench.train import training_step

CPU = BuildContext(device_type="cpu", total_steps=100, warmup_steps=5)


def hparams(name: str, **changes):
    """The optimizer's course defaults, resolved and validated as a run would."""
    return {**resolve_config(name, "smoke").hparams, **changes}


def zero_grad_param(seed: int = 0) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.randn(257, generator=torch.Generator().manual_seed(seed)))
    p.grad = torch.zeros_like(p)
    return p


def holder(*params: torch.nn.Parameter) -> torch.nn.Module:
    """A module holding just these parameters: optimizers are built from a model."""
    module = torch.nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"p{i}", p)
    return module


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    return build_model("vit_tiny_patch16_224", SPECS["synthetic"], seed, depth=1)


# --- registry --------------------------------------------------------------------------------------


def test_registry_holds_the_course_four_as_default_set_with_adamw_as_baseline():
    assert COURSE_SET == ("adamw", "lion", "sophia", "schedulefree")
    assert set(COURSE_SET) <= set(REGISTRY)
    assert BASELINE == "adamw"
    assert title_of("lion") == "Lion"
    assert title_of("someone-elses") == "someone-elses"


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'"):
        get_entry("adam")


def _library_class(dotted: str) -> type:
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name,cls", [("adamw", "torch.optim.AdamW"), ("lion", "lion_pytorch.Lion"),
                                      ("sophia", "pytorch_optimizer.SophiaH"),
                                      ("schedulefree", "schedulefree.AdamWScheduleFree")])
def test_each_entry_builds_its_real_library_class(name, cls):
    built = get_entry(name).make(tiny_vit(), hparams(name), CPU)
    assert type(built.optimizer) is _library_class(cls)
    assert built.implementation["class"] == cls
    assert built.optimizer.param_groups[0]["lr"] == hparams(name)["lr"]


def test_only_schedulefree_goes_without_the_external_schedule():
    assert {n for n, e in REGISTRY.items() if not e.external_schedule} == {"schedulefree"}


def test_adamw_implementation_is_chosen_by_device_and_recorded():
    cpu = get_entry("adamw").make(tiny_vit(), hparams("adamw"), CPU)
    assert cpu.implementation["code_path"] == "forloop" and cpu.optimizer.defaults["foreach"] is False
    cuda_ctx = BuildContext(device_type="cuda", total_steps=100, warmup_steps=5)
    cuda = get_entry("adamw").make(tiny_vit(), hparams("adamw"), cuda_ctx)
    assert cuda.implementation["code_path"] == "fused" and cuda.optimizer.defaults["fused"] is True
    with pytest.raises(ConfigError, match="implementation 'turbo' unknown"):
        get_entry("adamw").make(tiny_vit(), hparams("adamw", implementation="turbo"), CPU)


# --- Lion: decoupled_weight_decay ------------------------------------------------------------------


def test_lion_zero_grad_step_shrinks_weights_by_exactly_one_minus_lr_wd():
    hp = hparams("lion")
    p = zero_grad_param()
    before = p.detach().clone()
    built = get_entry("lion").make(holder(p), hp, CPU)
    built.optimizer.step()
    assert torch.equal(p.detach(), before * (1 - hp["lr"] * hp["weight_decay"]))
    assert built.optimizer.decoupled_wd is False
    assert built.implementation["decoupled_weight_decay"] is False


def test_lion_decoupled_weight_decay_true_would_not_shrink_by_lr_wd():
    """The trap the registry avoids: True divides wd by the initial lr (0.5 -> halves weights per step)."""
    from lion_pytorch import Lion

    hp = hparams("lion")
    p = zero_grad_param()
    before = p.detach().clone()
    Lion([p], lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"],
         decoupled_weight_decay=True).step()
    assert not torch.allclose(p.detach(), before * (1 - hp["lr"] * hp["weight_decay"]))
    assert torch.allclose(p.detach(), before * (1 - hp["weight_decay"]))


def test_lion_warnings_for_adamw_scale_lr_and_tiny_weight_decay():
    warn = get_entry("lion").warnings
    big = RunSettings(batch_size=128)
    assert warn(hparams("lion"), big) == []
    texts = warn(hparams("lion", lr=1e-3, weight_decay=0.01), big)
    assert len(texts) == 2
    assert "lr 0.001" in texts[0] and "diverge" in texts[0]
    assert "weight decay 0.01" in texts[1] and "3-10x" in texts[1]
    assert get_entry("adamw").warnings(hparams("adamw", lr=1e-3, weight_decay=0.01), big) == []


def test_lion_weight_decay_below_three_times_adamws_is_warned_with_the_courses_fix():
    """The course: raise Lion's weight decay 3-10x over AdamW's. AdamW's default is 0.05, so 0.1 (2x) is
    a mistake the old absolute threshold (< 0.1) let through, and 0.15 (3x) is not."""
    warn, big = get_entry("lion").warnings, RunSettings(batch_size=128)
    adamw_wd = get_entry(BASELINE).defaults()["weight_decay"]
    assert [t for t in warn(hparams("lion", weight_decay=2 * adamw_wd), big) if "weight decay" in t]
    assert not [t for t in warn(hparams("lion", weight_decay=3 * adamw_wd), big) if "weight decay" in t]


def test_lion_below_batch_64_is_warned_with_the_lectures_threshold():
    warn = get_entry("lion").warnings
    small = warn(hparams("lion"), RunSettings(batch_size=32))  # the smoke preset's batch
    assert len(small) == 1 and "batch size 32" in small[0] and "below 64" in small[0]
    assert warn(hparams("lion"), RunSettings(batch_size=64)) == []


def test_sophia_hessian_estimated_more_often_than_every_10_steps_is_warned():
    warn, settings = get_entry("sophia").warnings, RunSettings(batch_size=128)
    assert warn(hparams("sophia"), settings) == []  # the default: every 10 steps
    texts = warn(hparams("sophia", update_period=3), settings)
    assert len(texts) == 1 and "update_period 3" in texts[0] and "every 10 steps" in texts[0]


@pytest.mark.parametrize("key", ["scheduler", "lr_scheduler", "schedule", "cosine"])
def test_schedulefree_with_a_scheduler_is_refused_with_the_courses_reason(key):
    with pytest.raises(ConfigError) as caught:
        resolve_config("schedulefree", "smoke", hparam_overrides={key: "cosine"})
    assert "no learning-rate schedule" in str(caught.value) and "do NOT use an external scheduler" in str(caught.value)
    with pytest.raises(ConfigError, match="has no hyperparameter"):  # other unknown keys: as before
        resolve_config("schedulefree", "smoke", hparam_overrides={"momentum": 0.9})


def test_sophia_state_note_names_the_third_buffer_the_library_really_keeps(synthetic_data):
    """The note explains the measured 3x: SophiaH's state holds exactly momentum, hessian_moment and hessian."""
    note = get_entry("sophia").state_note
    model = build_model("vit_tiny_patch16_224", SPECS["synthetic"], seed=0, depth=1)
    opt = get_entry("sophia").make(model, hparams("sophia"), CPU).optimizer
    x, y = next(iter(train_batches(synthetic_data, 16, seed=0, epoch=1, augment=False)))
    training_step(model, opt, get_entry("sophia"), x, y, torch.autocast("cpu", enabled=False), hessian=True)
    keys = {k for state in opt.state.values() for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}
    assert keys == {"momentum", "hessian_moment", "hessian"}
    assert all(k in note for k in keys) and "3x" in note


# --- SophiaH: weight decay scale and Hessian steps -------------------------------------------------


def test_sophia_zero_grad_hessian_step_shrinks_weights_by_exactly_one_minus_lr_wd():
    """SophiaH multiplies its weight decay by lr. With a loss whose gradient is identically zero (but
    differentiable, as a Hessian step needs) one step changes the weights by the decay only."""
    hp = hparams("sophia")
    p = torch.nn.Parameter(torch.randn(257, generator=torch.Generator().manual_seed(0)))
    before = p.detach().clone()
    entry = get_entry("sophia")
    opt = entry.make(holder(p), hp, CPU).optimizer
    assert entry.hessian_due(opt)  # the very first step estimates the Hessian
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        (0.0 * (p ** 2).sum()).backward(create_graph=True)
    assert torch.count_nonzero(p.grad) == 0
    opt.step()
    factor = 1 - hp["lr"] * hp["weight_decay"]
    assert torch.equal(p.detach(), before * factor)
    assert not torch.allclose(p.detach(), before * (1 - hp["weight_decay"]))  # not fixed_decay
    assert "hessian" in opt.state[p]


def test_sophia_hessian_is_due_every_update_period_steps_counted_before_the_step():
    entry = get_entry("sophia")
    model = tiny_vit()
    data_x = torch.randn(4, 3, 16, 16)
    data_y = torch.arange(4)
    opt = entry.make(model, hparams("sophia", update_period=3), CPU).optimizer
    due = []
    for _ in range(7):
        hessian = entry.hessian_due(opt)
        due.append(hessian)
        training_step(model, opt, entry, data_x, data_y, torch.autocast("cpu", enabled=False), hessian)
    assert due == [True, False, False, True, False, False, True]


def test_sophia_plain_step_needs_no_second_order_graph_but_hessian_step_does():
    """A Hessian step without create_graph=True raises inside SophiaH: the loop must know which is which."""
    entry = get_entry("sophia")
    model = tiny_vit()
    opt = entry.make(model, hparams("sophia"), CPU).optimizer
    F.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 1])).backward()
    with pytest.raises(RuntimeError):
        opt.step()


# --- Schedule-Free: y and the average x ------------------------------------------------------------


def test_schedulefree_eval_mode_swaps_in_the_averaged_weights(synthetic_data):
    """schedulefree 1.4.1: in train mode the parameters hold y; eval() lerps them to z with weight
    1 - 1/beta1, i.e. x = (y - (1 - beta1) * z) / beta1; train() goes back to y."""
    entry = get_entry("schedulefree")
    model = tiny_vit()
    built = entry.make(model, hparams("schedulefree"), CPU)
    opt = built.optimizer
    assert built.implementation["warmup_steps"] == CPU.warmup_steps == opt.param_groups[0]["warmup_steps"]
    entry.train_mode(opt)
    amp = torch.autocast("cpu", enabled=False)
    for step, (x, y) in enumerate(train_batches(synthetic_data, 16, seed=0, epoch=1, augment=True)):
        training_step(model, opt, entry, x, y, amp, hessian=False)
        if step == 5:
            break
    params = list(model.parameters())
    y_params = [p.detach().clone() for p in params]
    z_params = [opt.state[p]["z"].clone() for p in params]
    beta1 = opt.param_groups[0]["betas"][0]

    entry.eval_mode(opt)
    assert opt.param_groups[0]["train_mode"] is False
    moved = 0
    for p, y, z in zip(params, y_params, z_params):
        x = (y - (1 - beta1) * z) / beta1
        assert torch.allclose(p.detach(), x, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(p.detach(), y))
    assert moved == len(params)  # every parameter now differs from y

    entry.train_mode(opt)
    for p, y in zip(params, y_params):
        assert torch.allclose(p.detach(), y, rtol=1e-5, atol=1e-6)


def test_schedulefree_refuses_to_step_outside_train_mode():
    entry = get_entry("schedulefree")
    p = zero_grad_param()
    opt = entry.make(holder(p), hparams("schedulefree"), CPU).optimizer
    with pytest.raises(Exception, match="train mode"):
        opt.step()
    entry.train_mode(opt)
    opt.step()


# --- optimizer state -------------------------------------------------------------------------------


def one_step_state_bytes(name: str) -> tuple[int, torch.optim.Optimizer, torch.nn.Module]:
    entry = get_entry(name)
    model = tiny_vit()
    opt = entry.make(model, hparams(name), CPU).optimizer
    assert optimizer_state_bytes(opt) == 0  # all four allocate state lazily
    entry.train_mode(opt)
    hessian = entry.hessian_due(opt)
    training_step(model, opt, entry, torch.randn(4, 3, 16, 16), torch.arange(4), torch.autocast("cpu", enabled=False),
                  hessian)
    return optimizer_state_bytes(opt), opt, model


def test_state_bytes_per_parameter_match_each_optimizers_state():
    """fp32 state per parameter: AdamW 8 B, Lion 4 B (exactly half), Sophia 12 B (1.5x), Schedule-Free 8 B.
    AdamW also keeps one 4-byte `step` tensor per parameter tensor; that counter is the only difference."""
    sizes = {name: one_step_state_bytes(name) for name in COURSE_SET}
    adamw_bytes, adamw_opt, model = sizes["adamw"]
    param_bytes = sum(p.nbytes for p in model.parameters())
    step_counter_bytes = sum(s["step"].nbytes for s in adamw_opt.state.values())
    assert step_counter_bytes == 4 * len(list(model.parameters()))
    per_element = adamw_bytes - step_counter_bytes
    assert per_element == 2 * param_bytes
    assert 2 * sizes["lion"][0] == per_element
    assert 2 * sizes["sophia"][0] == 3 * per_element
    assert sizes["schedulefree"][0] == per_element
