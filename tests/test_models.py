"""The model registry: timm's ViT-Tiny sized for each dataset's images, and the CIFAR ResNet-18."""

from __future__ import annotations

import pytest
import torch

import json

from typer.testing import CliRunner

from optbench.cli import app
from optbench.config import resolve_config
from optbench.data import SPECS
from optbench.errors import ConfigError
from optbench.models import DEFAULT_MODEL, build_model, get_model, model_title, param_count
from optbench.records import load_records


def test_vit_tiny_for_cifar100_has_patch_4_65_tokens_and_about_5_4m_params():
    model = build_model("vit_tiny_patch16_224", SPECS["cifar100"], seed=0)
    assert model.patch_embed.patch_size == (4, 4)
    assert model.patch_embed.num_patches == 64
    with torch.inference_mode():
        tokens = model.forward_features(torch.zeros(1, 3, 32, 32))
        logits = model(torch.zeros(2, 3, 32, 32))
    assert tokens.shape == (1, 65, 192)  # 8x8 patches + class token, width 192
    assert logits.shape == (2, 100)
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 3
    assert 5.30e6 < param_count(model) < 5.45e6


def test_patch_size_comes_from_the_dataset_and_depth_can_be_cut():
    digits = build_model("vit_tiny_patch16_224", SPECS["digits"], seed=0, depth=2)
    assert digits.patch_embed.patch_size == (2, 2) and digits.patch_embed.num_patches == 16
    assert len(digits.blocks) == 2
    assert digits.patch_embed.proj.in_channels == 1
    with torch.inference_mode():
        assert digits(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    other = build_model("vit_tiny_patch16_224", SPECS["synthetic"], seed=0, patch_size=8, depth=1)
    assert other.patch_embed.num_patches == 4


def test_same_seed_same_weights_other_seed_other_weights():
    a = build_model("vit_tiny_patch16_224", SPECS["synthetic"], seed=0, depth=1).state_dict()
    b = build_model("vit_tiny_patch16_224", SPECS["synthetic"], seed=0, depth=1).state_dict()
    c = build_model("vit_tiny_patch16_224", SPECS["synthetic"], seed=1, depth=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_patch_that_does_not_divide_the_image_is_a_config_error():
    with pytest.raises(ConfigError, match="patch size 5 does not divide the 32px images"):
        build_model("vit_tiny_patch16_224", SPECS["cifar10"], seed=0, patch_size=5)


def test_unknown_model_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown model 'no_such_vit': choose vit_tiny_patch16_224 or resnet18_cifar"):
        build_model("no_such_vit", SPECS["cifar10"], seed=0)


# --- ResNet-18 with the CIFAR stem ------------------------------------------------------------------


def test_resnet18_cifar_has_the_3x3_stride_1_stem_no_maxpool_batchnorm_and_11_2m_params():
    model = build_model("resnet18_cifar", SPECS["cifar10"], seed=0)
    stem = model.conv1
    assert (stem.kernel_size, stem.stride, stem.padding, stem.in_channels) == ((3, 3), (1, 1), (1, 1), 3)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20  # stem + 2 per block + 3 downsamples
    assert param_count(model) == 11_173_962  # the CIFAR ResNet-18 (kuangliu/pytorch-cifar has the same count)
    with torch.inference_mode():
        model.eval()
        assert model.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 4, 4)  # 32 -> 4 after 3 strides
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    digits = build_model("resnet18", SPECS["digits"], seed=0)  # the alias; one channel, 8x8
    assert digits.conv1.in_channels == 1 and digits(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_resnet18_cifar_is_seeded_and_builds_on_the_meta_device():
    a = build_model("resnet18_cifar", SPECS["synthetic"], seed=0).state_dict()
    b = build_model("resnet18_cifar", SPECS["synthetic"], seed=0).state_dict()
    c = build_model("resnet18_cifar", SPECS["synthetic"], seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    meta = build_model("resnet18_cifar", SPECS["synthetic"], seed=None, device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"} and param_count(meta) == param_count(
        build_model("resnet18_cifar", SPECS["synthetic"], seed=0))


def test_patch_size_and_depth_mean_nothing_to_the_resnet():
    with pytest.raises(ConfigError, match="resnet18_cifar has no patch size to set .*drop --patch-size"):
        build_model("resnet18_cifar", SPECS["cifar10"], patch_size=4)
    with pytest.raises(ConfigError, match="resnet18_cifar has no depth to set .*drop --depth"):
        resolve_config("adamw", "smoke", {"model": "resnet18_cifar", "depth": 2})
    # The smoke preset's depth 4 is a ViT knob: dropped, not an error, and not part of the identity.
    config = resolve_config("adamw", "smoke", {"model": "resnet18"})
    assert config.model == "resnet18_cifar" and config.depth is None and config.patch_size is None
    vit = resolve_config("adamw", "smoke")
    assert vit.model == DEFAULT_MODEL and vit.depth == 4
    assert config.config_hash != vit.config_hash
    assert resolve_config("adamw", "smoke", {"model": "vit_tiny"}).config_hash == vit.config_hash


def test_titles_come_from_the_registry():
    assert model_title("resnet18_cifar") == "ResNet-18 (CIFAR stem)" and model_title(DEFAULT_MODEL) == "ViT-Tiny"
    assert model_title("vit_base_patch16_224") == "ViT-Base"  # any timm ViT, as a person says it
    assert model_title("some_foreign_model") == "some_foreign_model"
    assert get_model("vit_small_patch16_224").patched


def test_model_option_in_run_and_memory():
    runner = CliRunner()
    dry = runner.invoke(app, ["run", "-o", "adamw", "--preset", "smoke", "--model", "resnet18", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["model"] == "resnet18_cifar"
    bad = runner.invoke(app, ["run", "-o", "adamw", "--model", "resnet18_cifar", "--depth", "2", "--dry-run"])
    assert bad.exit_code == 1 and "drop --depth" in bad.output and "Traceback" not in bad.output
    unknown = runner.invoke(app, ["compare", "--model", "resnet50", "--preset", "smoke"])
    assert unknown.exit_code == 1 and "unknown model 'resnet50'" in unknown.output
    memory = runner.invoke(app, ["memory", "--model", "resnet18_cifar", "--batch-size", "2", "--num-classes", "10",
                                 "--method", "estimate", "--optimizers", "adamw,lion"])
    assert memory.exit_code == 0, memory.output
    assert "ResNet-18 (CIFAR stem) (resnet18_cifar), 11,173,962 parameters, 32px, batch 2" in " ".join(
        memory.output.split())  # the table title wraps at the terminal's width
    patched = runner.invoke(app, ["memory", "--model", "resnet18_cifar", "--batch-size", "2", "--patch-size", "4"])
    assert patched.exit_code == 1 and "drop --patch-size" in patched.output


def test_a_resnet_comparison_records_and_reports_its_model(tmp_path):
    results = tmp_path / "results"
    done = CliRunner().invoke(app, ["compare", "--preset", "smoke", "--model", "resnet18", "--optimizers",
                                    "adamw,muon", "--dataset", "digits", "--epochs", "1", "--subset", "64",
                                    "--test-subset", "40", "--batch-size", "32", "--device", "cpu",
                                    "--results-dir", str(results), "--quiet"])
    assert done.exit_code == 0, done.output
    assert "ResNet-18 (CIFAR stem)" in done.output
    # Muon on a ResNet: every weight is a 4-D convolution or the head, so torch's Muon gets nothing; said so.
    assert "'muon: hidden matrices' holds no parameter of resnet18_cifar" in done.output
    records = load_records(results).records
    assert {r["optimizer"] for r in records} == {"adamw", "muon"}
    for record in records:
        assert record["status"] == "ok"
        assert record["config"]["model"] == "resnet18_cifar" and record["config"]["depth"] is None
        assert record["model"]["title"] == "ResNet-18 (CIFAR stem)" and record["model"]["param_count"] == 11_172_810
