"""timm's ViT-Tiny, sized for each dataset's images."""

from __future__ import annotations

import pytest
import torch

from optbench.data import SPECS
from optbench.errors import ConfigError
from optbench.models import build_model, param_count


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


def test_unknown_timm_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown timm model 'no_such_vit'"):
        build_model("no_such_vit", SPECS["cifar10"], seed=0)
