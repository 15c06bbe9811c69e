"""Models from timm, sized for an input shape: the one place a model is built and its patch is chosen.

`build_model` serves training (real tensors, seeded), the memory probe and the `memory` command (on the
meta device, then materialised as fake tensors): every model optbench measures is built here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from optbench.errors import ConfigError

MIN_GRID = 8  # default patch: keep at least 8x8 patches (32px -> patch 4, 224px -> patch 16)


@dataclass(frozen=True)
class InputShape:
    """What a model must fit. `DatasetSpec` has the same fields, so a dataset's spec is an InputShape."""

    image_size: int
    channels: int
    num_classes: int
    patch_size: int | None = None  # the data's preferred ViT patch (e.g. 2 for 8x8 digits), if any


def default_patch_size(model: str, image_size: int) -> int:
    """The model's own patch (from its name, else 16) if it leaves a grid of >= 8x8 patches; otherwise
    the largest divisor of the image size that does (32px -> 4, 64px -> 8, 224px -> 16)."""
    match = re.search(r"patch(\d+)", model)
    native = int(match.group(1)) if match else 16
    if image_size % native == 0 and image_size // native >= MIN_GRID:
        return native
    fitting = [d for d in range(1, image_size + 1) if image_size % d == 0 and image_size // d >= MIN_GRID]
    return max(fitting) if fitting else 1


def resolve_patch_size(model: str, shape: Any, requested: int | None = None) -> int:
    """The ViT patch a run uses: the one asked for, else the data's preferred one, else the default rule.

    timm's ViT-Tiny is built for 224x224 with 16x16 patches; at 32x32 that is a 2x2 grid, so the patch
    follows the input (4 for CIFAR: 8x8 patches + class token = 65 tokens)."""
    patch = requested or getattr(shape, "patch_size", None) or default_patch_size(model, shape.image_size)
    if shape.image_size % patch:
        raise ConfigError(f"patch size {patch} does not divide the {shape.image_size}px images: "
                          f"pick a divisor of {shape.image_size}")
    return patch


def build_model(name: str, shape: Any, seed: int | None = 0, patch_size: int | None = None,
                depth: int | None = None, device: Any = None):
    """A randomly initialised timm ViT for `shape` (an InputShape or a DatasetSpec).

    `seed`: the same seed gives the same weights (None: the global generator as it is, for models whose
    values do not matter, e.g. on the meta device). `device`: where to create it ("meta" allocates
    nothing). Raises ConfigError for unknown models and models that are not ViTs.
    """
    import timm
    import torch

    patch = resolve_patch_size(name, shape, patch_size)
    extra = {"depth": depth} if depth else {}
    if seed is not None:
        torch.manual_seed(seed)
    try:
        with torch.device(device) if device is not None else _nothing():
            return timm.create_model(name, pretrained=False, img_size=shape.image_size, patch_size=patch,
                                     in_chans=shape.channels, num_classes=shape.num_classes, **extra)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"unknown timm model '{name}': use a timm ViT name such as vit_tiny_patch16_224") from None
        raise
    except TypeError as exc:
        raise ConfigError(f"timm model '{name}' does not take ViT size arguments ({exc}): use a timm ViT") from None


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def model_facts(model, patch_size: int | None = None) -> dict[str, Any]:
    """What was built, for records and titles: patch, tokens, depth, width, parameters."""
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    blocks = getattr(model, "blocks", None)
    return {
        "patch_size": int(patch[0]) if isinstance(patch, (tuple, list)) else patch or patch_size,
        "tokens": (getattr(embed, "num_patches", 0) or 0) + int(getattr(model, "num_prefix_tokens", 0)),
        "depth": len(blocks) if blocks is not None else None,
        "width": getattr(model, "embed_dim", None),
        "param_count": param_count(model),
    }


def model_title(name: str) -> str:
    """A timm ViT name as a person says it: vit_tiny_patch16_224 -> ViT-Tiny (other names as they are)."""
    match = re.match(r"vit_([a-z]+?)_(?:patch|\d)", name)
    return f"ViT-{match.group(1).capitalize()}" if match else name


def model_label(facts: dict[str, Any]) -> str:
    """What ran, for every title: "ViT-Tiny, patch 4 on 32 px, depth 4, width 192" (from a record's
    `model` block; a part it lacks is left out rather than guessed)."""
    parts = [model_title(str(facts.get("name", "model")))]
    if facts.get("patch_size") and facts.get("image_size"):
        parts.append(f"patch {facts['patch_size']} on {facts['image_size']} px")
    elif facts.get("patch_size"):
        parts.append(f"patch {facts['patch_size']}")
    for key in ("depth", "width"):
        if facts.get(key):
            parts.append(f"{key} {facts[key]}")
    return ", ".join(parts)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
