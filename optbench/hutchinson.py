"""Hutchinson estimates of the Hessian diagonal, z * (H z), on the first images of a batch.

Used for Sophia's `hessian_batch` (registry entry): the gradient and the step stay on the full batch,
with timm's fused attention and no `create_graph`; only this estimate runs a second-order graph, on a
sub-batch, in math attention (the fused kernel cannot be differentiated twice).

Contract: draws the probe vector exactly as pytorch_optimizer's `compute_hutchinson_hessian` does (one
draw per parameter, in parameter order, from the global RNG), so with the same RNG state and the whole
batch it returns the optimizer's own estimate. It leaves `p.grad` untouched (`torch.autograd.grad`, not
`backward`) and frees its graph before returning, so the step's own forward starts from a clean slate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def probe_vector(params: list[torch.Tensor], distribution: str) -> list[torch.Tensor]:
    if distribution == "rademacher":
        return [torch.randint_like(p, 0, 2) * 2.0 - 1.0 for p in params]
    return [torch.randn_like(p) for p in params]


def hutchinson_diagonal(model: torch.nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        amp, distribution: str) -> list[torch.Tensor]:
    """z * (H z) of the mean cross-entropy on (x, y), one tensor per parameter (zeros where unused)."""
    with amp, sdpa_kernel(SDPBackend.MATH):
        loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None]
    zs = probe_vector([params[i] for i in used], distribution)
    h_zs = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used], grad_outputs=zs)
    out = [torch.zeros_like(p) for p in params]
    for i, z, h_z in zip(used, zs, h_zs):
        out[i] = (h_z * z).detach()
    return out
