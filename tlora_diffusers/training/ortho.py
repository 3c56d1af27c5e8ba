"""Add, export and remove native ortho T-LoRA layers (see :mod:`tlora_diffusers.backends.native`)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..backends.native import OrthoTLoRALayer
from ..ortho import SIG_TYPES, random_basis, svd_basis
from .targets import check_rank

__all__ = ["add_ortho_tlora", "remove_ortho_tlora", "ortho_layers", "orthogonality_penalty", "export_ortho_peft"]


def ortho_layers(denoiser: nn.Module) -> dict[str, OrthoTLoRALayer]:
    return {n: m for n, m in denoiser.named_modules() if isinstance(m, OrthoTLoRALayer)}


def add_ortho_tlora(
    denoiser: nn.Module,
    paths: Sequence[str],
    rank: int,
    *,
    sig_type: str = "last",
    init: str = "random",
    scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> list[str]:
    """Wrap each layer in ``paths`` with an ortho T-LoRA initialised from an SVD.

    ``init="random"``: SVD of a random N(0, 1/r²) matrix (the paper's SDXL recipe, with
    ``sig_type="last"``); ``init="weight"``: SVD of the layer's own weight (LyCORIS's default
    with ``sig_type="principal"``). Checks every layer before changing any.
    """
    if sig_type not in SIG_TYPES:
        raise ValueError(f"sig_type must be one of {SIG_TYPES}, got {sig_type!r}")
    if init not in ("random", "weight"):
        raise ValueError(f"init must be 'random' or 'weight', got {init!r}")
    if ortho_layers(denoiser):
        raise RuntimeError("this denoiser already has ortho T-LoRA layers; remove_ortho_tlora() first")
    check_rank(denoiser, paths, rank)
    modules = dict(denoiser.named_modules())
    for path in paths:
        base = modules[path]
        weight = base.weight.detach().float().reshape(base.weight.shape[0], -1)
        if init == "weight":
            p, lam, q = svd_basis(weight, rank, sig_type, where=path)
        else:
            p, lam, q = random_basis(*weight.shape, rank, sig_type, generator=generator, where=path)
        layer = OrthoTLoRALayer(base, p, lam, q, scale)
        parent_path, _, child = path.rpartition(".")
        parent = denoiser.get_submodule(parent_path) if parent_path else denoiser
        setattr(parent, child, layer)
    return list(paths)


def remove_ortho_tlora(denoiser: nn.Module) -> None:
    """Put the original layers back (their weights were never changed)."""
    for path, layer in ortho_layers(denoiser).items():
        parent_path, _, child = path.rpartition(".")
        parent = denoiser.get_submodule(parent_path) if parent_path else denoiser
        setattr(parent, child, layer.base_layer)


def orthogonality_penalty(denoiser: nn.Module) -> torch.Tensor:
    """Sum of ``‖PᵀP − I‖² + ‖QQᵀ − I‖²`` over all ortho layers."""
    layers = list(ortho_layers(denoiser).values())
    if not layers:
        raise ValueError("no ortho T-LoRA layers in this denoiser")
    return torch.stack([layer.orthogonality_penalty() for layer in layers]).sum()


def export_ortho_peft(denoiser: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT tensors and ``LoraConfig`` dict of the exact paired encoding (rank 2R, scaling 1)."""
    layers = ortho_layers(denoiser)
    if not layers:
        raise ValueError("no ortho T-LoRA layers in this denoiser")
    state_dict, ranks = {}, set()
    for path, layer in layers.items():
        a, b = layer.lora_factors()
        state_dict[f"{path}.lora_A.weight"] = a
        state_dict[f"{path}.lora_B.weight"] = b
        ranks.add(layer.rank)
    if len(ranks) != 1:
        raise ValueError(f"ortho layers have different ranks {sorted(ranks)}")
    r2 = 2 * ranks.pop()
    return state_dict, {"r": r2, "lora_alpha": r2, "target_modules": sorted(layers)}
