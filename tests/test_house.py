"""The house: no import circles, one registry that alone names optimizers (and is enough to add one),
settings shipped inside the package, and the newer optimizers with their traps pinned.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from optbench.cli import app
from optbench.config import resolve_config
from optbench.data import SPECS, train_batches
from optbench.measure import optimizer_state_bytes
from optbench.models import build_model
from optbench.optimizers import (COURSE_SET, REGISTRY, BuildContext, Built, OptimizerEntry, StateLayout, _one_group,
                                 get_entry, optimizer_names, register)
from optbench.train import training_step

PACKAGE = Path(__file__).resolve().parent.parent / "optbench"
CPU = BuildContext(device_type="cpu", total_steps=100, warmup_steps=0)


def _internal_imports(path: Path) -> set[str]:
    """optbench modules imported anywhere in `path` (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optbench"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out |= {n.split(".", 1)[1] for n in names if "." in n and (PACKAGE / f"{n.split('.', 1)[1]}.py").exists()}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in node.names
                    if a.name.startswith("optbench.") and (PACKAGE / f"{a.name.split('.', 1)[1]}.py").exists()}
    return out


def test_no_import_circle_in_the_package():
    graph = {p.stem: _internal_imports(p) - {p.stem} for p in PACKAGE.glob("*.py")}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < len(graph):
                visit(nxt, path + [nxt])

    for start in graph:
        visit(start, [start])
    assert not cycles, f"import circles: {cycles[:3]}"


def test_no_module_but_the_registry_names_an_optimizer():
    # muon.py is the registry's glue for its Muon entry (its groups are tagged "muon" / "adamw").
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, optimizer_names())))
    offenders = [f"{p.name}:{i}: {line.strip()}" for p in PACKAGE.glob("*.py") if p.name not in ("optimizers.py", "muon.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_no_module_but_the_model_registry_names_a_model():
    from optbench.models import ALIASES, REGISTRY as MODELS

    pattern = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, [*MODELS, *ALIASES])))
    offenders = [f"{p.name}:{i}: {line.strip()}" for p in PACKAGE.glob("*.py") if p.name != "models.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_analysis_and_renderers_import_no_torch():
    code = ("import sys; import optbench.analysis, optbench.render, optbench.report, optbench.html_report; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# --- a sixth optimizer from one entry --------------------------------------------------------------


@pytest.fixture
def sixth_optimizer(tmp_path, monkeypatch):
    """A test-only entry (torch's SGD with momentum) and its YAML in a user override folder."""
    (tmp_path / "config" / "optimizers").mkdir(parents=True)
    (tmp_path / "config" / "optimizers" / "sgdm.yaml").write_text(
        "lr: 0.05\nweight_decay: 0.0\nmomentum: 0.9\n"
        "search_space:\n  lr: {low: 0.01, high: 0.1, log: true, grid: [0.01, 0.05, 0.1]}\n")
    monkeypatch.setenv("OPTBENCH_CONFIG_DIR", str(tmp_path / "config"))

    def build(groups, hp, ctx):
        opt = torch.optim.SGD([{"params": g.params} for g in groups], lr=hp["lr"], momentum=hp["momentum"],
                              weight_decay=hp["weight_decay"])
        return Built(opt, {"class": "torch.optim.SGD", "code_path": "forloop"})

    entry = OptimizerEntry("sgdm", "SGD momentum (test)", "#000000", "torch", build,
                           group_params=_one_group(StateLayout(("momentum_buffer",))))
    monkeypatch.setitem(REGISTRY, "sgdm", entry)
    return entry


def test_a_sixth_optimizer_is_one_entry_and_reaches_compare_memory_toy_and_report(sixth_optimizer, tmp_path):
    assert register is not None and "sgdm" in optimizer_names()
    runner = CliRunner()
    results = tmp_path / "results"
    compared = runner.invoke(app, ["compare", "--preset", "smoke", "--optimizers", "adamw,sgdm", "--dataset",
                                   "synthetic", "--depth", "1", "--epochs", "1", "--subset", "80", "--test-subset",
                                   "40", "--batch-size", "16", "--device", "cpu", "--results-dir", str(results),
                                   "--quiet"])
    assert compared.exit_code == 0, compared.output
    assert "SGD momentum (test)" in compared.output
    reported = runner.invoke(app, ["report", str(results)])
    assert reported.exit_code == 0 and "SGD momentum (test)" in reported.output, reported.output
    memory = runner.invoke(app, ["memory", "--model", "vit_tiny_patch16_224", "--image-size", "16", "--batch-size",
                                 "2", "--num-classes", "10", "--method", "estimate", "--optimizers", "sgdm"])
    assert memory.exit_code == 0, memory.output
    assert "SGD momentum" in memory.output
    toy = runner.invoke(app, ["toy", "--steps", "5", "--optimizers", "adamw,sgdm", "--out", str(tmp_path / "toy")])
    assert toy.exit_code == 0, toy.output
    assert "SGD momentum (test)" in toy.output


# --- settings inside the package -------------------------------------------------------------------


def test_a_non_editable_install_finds_its_settings_from_any_directory(tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(PACKAGE.parent)], capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OPTBENCH_CONFIG_DIR"}
    env["PYTHONPATH"] = str(target)
    code = ("import optbench.settings as s, optbench.config as c; assert s.PACKAGE_CONFIG_DIR.is_dir(); "
            "print(s.PACKAGE_CONFIG_DIR); print(c.resolve_config('muon', 'smoke').hparams['lr'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(target) in done.stdout and "0.02" in done.stdout
    helped = subprocess.run([sys.executable, "-m", "optbench", "--help"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and "compare" in helped.stdout


def test_the_override_folder_wins_file_by_file(tmp_path, monkeypatch):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "lab.yaml").write_text("dataset: synthetic\ndepth: 1\nepochs: 1\n")
    (tmp_path / "optimizers").mkdir()
    (tmp_path / "optimizers" / "lion.yaml").write_text("lr: 3.0e-5\nweight_decay: 1.0\nbetas: [0.9, 0.99]\n")
    monkeypatch.setenv("OPTBENCH_CONFIG_DIR", str(tmp_path))
    assert resolve_config("lion", "lab").hparams["lr"] == 3e-5  # both from the override
    assert resolve_config("adamw", "smoke").hparams["lr"] == 1e-3  # the package's, not shadowed


def test_a_settings_file_that_is_not_utf8_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "latin.yaml").write_bytes("dataset: caf\xe9\n".encode("latin-1"))
    monkeypatch.setenv("OPTBENCH_CONFIG_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["run", "-o", "adamw", "--preset", "latin", "--dry-run"])
    assert result.exit_code == 1 and "not UTF-8" in result.output and "Traceback" not in result.output


# --- the newer optimizers --------------------------------------------------------------------------


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    return build_model("vit_tiny_patch16_224", SPECS["synthetic"], seed, depth=1)


def test_muon_takes_only_hidden_matrices_and_adamw_the_rest():
    model = tiny_vit()
    groups = get_entry("muon").group_params(model)
    muon, rest = groups
    head = {id(p) for p in model.get_classifier().parameters()}
    assert muon.params and all(p.ndim == 2 and id(p) not in head for p in muon.params)
    assert {id(p) for p in muon.params} | {id(p) for p in rest.params} == {id(p) for p in model.parameters()}
    assert any(p.ndim != 2 for p in rest.params) and head <= {id(p) for p in rest.params}
    with pytest.raises(ValueError):  # the trap: torch's Muon refuses anything that is not 2-D
        torch.optim.Muon(rest.params)


def _steps(name: str, model: torch.nn.Module, steps: int = 3, hparams: dict | None = None):
    data_spec = SPECS["synthetic"]
    from optbench.data import load_dataset

    data = load_dataset("synthetic", subset=64, test_subset=20)
    entry = get_entry(name)
    built = entry.make(model, hparams or resolve_config(name, "smoke").hparams, CPU)
    entry.train_mode(built.optimizer)
    losses = []
    for i, (x, y) in enumerate(train_batches(data, 16, 0, 1, False)):
        if i == steps:
            break
        losses.append(float(training_step(model, built.optimizer, entry, x, y, torch.autocast("cpu", enabled=False),
                                          entry.hessian_due(built.optimizer))))
    assert data_spec.image_size == 16
    return built, losses


def test_muon_with_adamw_state_round_trips_and_one_schedule_drives_both():
    torch.manual_seed(0)
    a, b = tiny_vit(), tiny_vit()
    built_a, _ = _steps("muon", a)
    built_b = get_entry("muon").make(b, resolve_config("muon", "smoke").hparams, CPU)
    b.load_state_dict(a.state_dict())
    # A deep copy: torch's load_state_dict keeps the very tensors it is given when no cast is needed.
    built_b.optimizer.load_state_dict(copy.deepcopy(built_a.optimizer.state_dict()))
    # After loading, the inner optimizers must step the loaded groups and state (not the old ones).
    for built in (built_a, built_b):
        for group in built.optimizer.param_groups:
            group["lr"] *= 0.5  # as a scheduler would
    x = torch.randn(4, 3, 16, 16)
    y = torch.arange(4)
    for model, built in ((a, built_a), (b, built_b)):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        built.optimizer.step()
        built.optimizer.zero_grad(set_to_none=True)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    inner = built_b.optimizer._inner
    assert inner["muon"].state is built_b.optimizer.state
    assert all(g in built_b.optimizer.param_groups for g in inner["muon"].param_groups + inner["adamw"].param_groups)


def test_muon_state_bytes_from_its_mixed_layout_equal_the_real_state_after_a_step():
    model = tiny_vit()
    built, _ = _steps("muon", model, steps=1)
    assert optimizer_state_bytes(built.optimizer) == get_entry("muon").state_layout_bytes(model)
    result = CliRunner().invoke(app, ["memory", "--model", "vit_tiny_patch16_224", "--image-size", "16",
                                      "--patch-size", "4", "--num-classes", "10", "--depth", "1", "--batch-size", "2",
                                      "--method", "tracked", "--optimizers", "muon"])
    assert result.exit_code == 0, result.output
    assert "differs from its known layout" not in result.output


@pytest.mark.parametrize("name", [n for n in optimizer_names() if n not in COURSE_SET])
def test_each_newer_optimizer_trains_from_its_yaml_and_its_state_is_as_declared(name):
    model = tiny_vit()
    before = [p.detach().clone() for p in model.parameters()]
    built, losses = _steps(name, model, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "three steps moved nothing"
    layout = get_entry(name).state_layout_bytes(model)
    if layout is not None:
        assert optimizer_state_bytes(built.optimizer) == layout
    else:  # SOAP: Kronecker factors, more than Adam's two moments
        assert optimizer_state_bytes(built.optimizer) > 8 * sum(p.numel() for p in model.parameters())


def test_soap_first_step_moves_no_weight():
    model = tiny_vit()
    before = [p.detach().clone() for p in model.parameters()]
    _steps("soap", model, steps=1)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_prodigy_lr_is_a_multiplier_of_its_own_estimate():
    model = tiny_vit()
    built, _ = _steps("prodigy", model, steps=3)
    group = built.optimizer.param_groups[0]
    assert group["lr"] == 1.0 and 0 < group["d"] < 1.0
    assert get_entry("prodigy").current_lr(built.optimizer) == pytest.approx(group["d"])
