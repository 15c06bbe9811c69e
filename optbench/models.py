"""The model registry: every model optbench trains or measures, built by one function.

An entry holds what optbench knows about a model: its title (tables, figures, records), where it comes
from, how to create it for an input shape, and which size knobs it takes. `build_model` is the one
builder: training (real tensors, seeded), the memory probe and the `memory` command (on the meta device,
then materialised as fake tensors) all call it, and it alone applies the patch-size rule.

- `vit_tiny_patch16_224` (the default): timm's ViT-Tiny (dim 192, 3 heads, depth 12). Built for 224x224
  with 16x16 patches; at 32x32 that is a 2x2 grid, so the patch follows the input (`resolve_patch_size`).
  `depth` cuts it. Any other timm ViT name (vit_base_patch16_224, ...) is accepted the same way.
- `resnet18_cifar`: timm's `resnet18` (BasicBlocks [2, 2, 2, 2], BatchNorm) with the standard CIFAR stem:
  a 3x3 stride-1 convolution instead of the 7x7 stride-2 one, and no max-pool, so a 32x32 image reaches
  the last stage at 4x4 instead of 1x1. timm's rather than torchvision's: the same architecture, but
  timm's takes `in_chans` (1-channel digits and Fashion-MNIST), has `get_classifier()` (the head the
  optimizer registry keeps out of Muon) and is the library the ViT already comes from. It has no patch
  and no depth knob.

This module imports torch and timm only inside functions: the analysis layer reads titles from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from optbench.errors import ConfigError

MIN_GRID = 8  # default patch: keep at least 8x8 patches (32px -> patch 4, 224px -> patch 16)
DEFAULT_MODEL = "vit_tiny_patch16_224"
ALIASES = {"vit_tiny": DEFAULT_MODEL, "resnet18": "resnet18_cifar"}


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


def resolve_patch_size(model: str, shape: Any, requested: int | None = None) -> int | None:
    """The ViT patch a run uses: the one asked for, else the data's preferred one, else the default rule;
    None for a model without patches (ResNet-18).

    timm's ViT-Tiny is built for 224x224 with 16x16 patches; at 32x32 that is a 2x2 grid, so the patch
    follows the input (4 for CIFAR: 8x8 patches + class token = 65 tokens)."""
    if not get_model(model).patched:
        return None
    patch = requested or getattr(shape, "patch_size", None) or default_patch_size(model, shape.image_size)
    if shape.image_size % patch:
        raise ConfigError(f"patch size {patch} does not divide the {shape.image_size}px images: "
                          f"pick a divisor of {shape.image_size}")
    return patch


@dataclass(frozen=True)
class ModelEntry:
    """One model. `create(shape, patch, depth)` makes it (seeding and device are the builder's)."""

    name: str  # what --model takes; records and workload ids hold it
    title: str  # for tables, figure titles and reports
    library: str
    create: Callable[[Any, int | None, int | None], Any]
    patched: bool = False  # takes a patch size (ViT): only then does patch_size mean anything
    takes_depth: bool = False  # `depth` cuts its blocks
    default_image_size: int = 224  # `memory` without --image-size
    source: str = ""


def _create_vit(timm_name: str) -> Callable[[Any, int | None, int | None], Any]:
    def create(shape, patch, depth):
        import timm

        extra = {"depth": depth} if depth else {}
        try:
            return timm.create_model(timm_name, pretrained=False, img_size=shape.image_size, patch_size=patch,
                                     in_chans=shape.channels, num_classes=shape.num_classes, **extra)
        except TypeError as exc:
            raise ConfigError(f"timm model '{timm_name}' does not take ViT size arguments ({exc}): "
                              "use a timm ViT") from None
    return create


def _create_resnet18_cifar(shape, patch, depth):
    import timm
    import torch

    model = timm.create_model("resnet18", pretrained=False, in_chans=shape.channels, num_classes=shape.num_classes)
    # The CIFAR stem (He et al. 2016, section 4.2; kuangliu/pytorch-cifar): 3x3 stride 1, no max-pool.
    stem = model.conv1
    model.conv1 = torch.nn.Conv2d(shape.channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    torch.nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's conv init
    model.maxpool = torch.nn.Identity()
    return model


REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    REGISTRY[entry.name] = entry
    return entry


register(ModelEntry(DEFAULT_MODEL, "ViT-Tiny", "timm", _create_vit(DEFAULT_MODEL), patched=True, takes_depth=True,
                    source="Dosovitskiy et al. 2021; timm vit_tiny_patch16_224 (dim 192, 3 heads, depth 12)"))
register(ModelEntry("resnet18_cifar", "ResNet-18 (CIFAR stem)", "timm", _create_resnet18_cifar, default_image_size=32,
                    source="He et al. 2016; timm resnet18 with a 3x3 stride-1 stem and no max-pool"))


def model_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def canonical_name(name: str) -> str:
    """The registry's name for `name` (aliases: vit_tiny, resnet18)."""
    return ALIASES.get(name, name)


def get_model(name: str) -> ModelEntry:
    """The entry for a model name; any timm ViT name not registered gets a ViT entry of its own.
    Raises ConfigError naming the choices."""
    name = canonical_name(name) if isinstance(name, str) else name
    if isinstance(name, str) and name in REGISTRY:
        return REGISTRY[name]
    if isinstance(name, str) and name.startswith("vit_"):
        import timm

        if timm.is_model(name):
            size = _name_number(name, r"_(\d+)$") or 224
            return ModelEntry(name, name, "timm", _create_vit(name), patched=True, takes_depth=True,
                              default_image_size=size, source=f"timm {name}")
    raise ConfigError(f"unknown model '{name}': choose {' or '.join(model_names())} "
                      "(or any timm ViT name, e.g. vit_base_patch16_224)")


def model_title(name: str) -> str:
    """Display name for a model key: the registry's title; another timm ViT name as a person says it
    (vit_base_patch16_224 -> ViT-Base); anything else (foreign records) as it is."""
    entry = REGISTRY.get(canonical_name(name)) if isinstance(name, str) else None
    if entry is not None:
        return entry.title
    match = re.match(r"vit_([a-z]+?)_(?:patch|\d)", str(name))
    return f"ViT-{match.group(1).capitalize()}" if match else str(name)


def _name_number(name: str, pattern: str) -> int | None:
    match = re.search(pattern, name)
    return int(match.group(1)) if match else None


def check_size_options(name: str, patch_size: int | None, depth: int | None, where: str = "") -> None:
    """ConfigError when a patch size or depth is asked of a model that has none (e.g. ResNet-18)."""
    entry = get_model(name)
    for option, value, takes in (("patch size", patch_size, entry.patched), ("depth", depth, entry.takes_depth)):
        if value is not None and not takes:
            flag = "--patch-size" if option == "patch size" else "--depth"
            raise ConfigError(f"{entry.name} has no {option} to set (it applies to ViTs){where}: drop {flag}")


def build_model(name: str, shape: Any, seed: int | None = 0, patch_size: int | None = None,
                depth: int | None = None, device: Any = None):
    """A randomly initialised model of the registry for `shape` (an InputShape or a DatasetSpec).

    `seed`: the same seed gives the same weights (None: the global generator as it is, for models whose
    values do not matter, e.g. on the meta device). `device`: where to create it ("meta" allocates
    nothing). Raises ConfigError for unknown models and for size options the model does not take.
    """
    import torch

    entry = get_model(name)
    check_size_options(entry.name, patch_size, depth)
    patch = resolve_patch_size(entry.name, shape, patch_size)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device) if device is not None else _nothing():
        return entry.create(shape, patch, depth)


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


def model_label(facts: dict[str, Any]) -> str:
    """What ran, for every title: "ViT-Tiny, patch 4 on 32 px, depth 4, width 192" (from a record's
    `model` block; a part it lacks is left out rather than guessed)."""
    parts = [model_title(str(facts.get("name", "model")))]
    if facts.get("patch_size") and facts.get("image_size"):
        parts.append(f"patch {facts['patch_size']} on {facts['image_size']} px")
    elif facts.get("patch_size"):
        parts.append(f"patch {facts['patch_size']}")
    elif facts.get("image_size"):  # a model without patches (ResNet-18)
        parts.append(f"{facts['image_size']} px")
    for key in ("depth", "width"):
        if facts.get(key):
            parts.append(f"{key} {facts[key]}")
    return ", ".join(parts)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
