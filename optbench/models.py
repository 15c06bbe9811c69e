"""ViT models from timm, sized for a dataset's images and classes."""

from __future__ import annotations

import torch

from optbench.data import DatasetSpec
from optbench.errors import ConfigError


def build_model(name: str, spec: DatasetSpec, seed: int, patch_size: int | None = None,
                depth: int | None = None) -> torch.nn.Module:
    """A randomly initialised timm ViT for `spec`; the same seed gives the same weights.

    timm's ViT-Tiny is built for 224x224 with 16x16 patches; at 32x32 that is a 2x2 grid, so the patch
    is taken from the dataset (4 for CIFAR: 8x8 patches + class token = 65 tokens).
    """
    import timm

    patch = patch_size or spec.patch_size
    if spec.image_size % patch:
        raise ConfigError(f"patch size {patch} does not divide the {spec.image_size}px images of {spec.title}: "
                          f"pick a divisor of {spec.image_size}")
    extra = {"depth": depth} if depth else {}
    torch.manual_seed(seed)
    try:
        return timm.create_model(name, pretrained=False, img_size=spec.image_size, patch_size=patch,
                                 in_chans=spec.channels, num_classes=spec.num_classes, **extra)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"unknown timm model '{name}': use a timm ViT name such as vit_tiny_patch16_224") from None
        raise
    except TypeError as exc:
        raise ConfigError(f"timm model '{name}' does not take ViT size arguments ({exc}): use a timm ViT") from None


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
