"""Pieces every format converter shares: the "needs more input" error, schedule options, LoRA configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import TLoRAConfig

__all__ = ["NeedsInputError", "check_denoiser", "schedule_config", "default_lora_config", "lora_rank"]


class NeedsInputError(ValueError):
    """A file cannot be converted without more input.

    ``needs`` is ``"cfg"`` (the schedule is not in the file) or ``"denoiser"`` (the base
    weights are needed); ``partial`` holds what was learnt from the file anyway (rank,
    variant, modules, ...), which ``inspect_tlora`` reports.
    """

    def __init__(self, message: str, needs: str, partial: Optional[dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.needs = needs
        self.partial = dict(partial or {})


def check_denoiser(denoiser: Any) -> None:
    """Converters take the denoiser module (or ``None``); catch a config passed in its place."""
    if denoiser is not None and not isinstance(denoiser, nn.Module):
        raise TypeError(
            f"denoiser must be an nn.Module (the pipeline's unet/transformer) or None, got {type(denoiser).__name__}; "
            "pass the schedule as cfg=TLoRAConfig(...)"
        )


def schedule_config(
    path: Path,
    max_rank: int,
    layout: str,
    cfg: Optional[TLoRAConfig],
    min_rank: Optional[int],
    alpha: Optional[float],
) -> Optional[TLoRAConfig]:
    """The schedule from ``cfg`` or the ``min_rank=``/``alpha=`` options; ``None`` if neither is given.

    ``max_rank`` comes from the tensor shapes and ``layout`` from the format, so both are
    checked against ``cfg`` rather than taken from it.
    """
    if cfg is not None:
        if not isinstance(cfg, TLoRAConfig):
            raise TypeError(f"cfg must be a TLoRAConfig, got {type(cfg).__name__}")
        if min_rank is not None or alpha is not None:
            raise ValueError(f"{path}: pass either cfg or min_rank=/alpha=, not both")
        if cfg.max_rank != max_rank:
            raise ValueError(f"{path}: cfg.max_rank={cfg.max_rank} but the file's tensors have rank {max_rank}")
        # How the file encodes its ranks (an ortho T-LoRA loads as an exact rank-2R "paired" PEFT
        # LoRA) is the file's business, not the caller's: the layout is taken from the format.
        return cfg if cfg.layout == layout else dataclasses.replace(cfg, layout=layout)
    if min_rank is None:
        if alpha is not None:
            raise ValueError(f"{path}: alpha= was given without min_rank=; pass both (or cfg=TLoRAConfig(...))")
        return None
    try:
        return TLoRAConfig(max_rank, min_rank, 1.0 if alpha is None else alpha, layout=layout)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def default_lora_config(state_dict: dict[str, torch.Tensor], rank: int, lora_alpha: Optional[float] = None) -> dict[str, Any]:
    """A ``LoraConfig`` dict targeting exactly the modules of ``state_dict`` (scaling ``lora_alpha / r``)."""
    targets = sorted({k.rpartition(".lora_")[0] for k in state_dict})
    return {"r": rank, "lora_alpha": rank if lora_alpha is None else lora_alpha, "target_modules": targets}


def lora_rank(state_dict: dict[str, torch.Tensor], path: Path) -> int:
    ranks = {v.shape[0] for k, v in state_dict.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"{path}: LoRA layers have different ranks {sorted(ranks)}; a T-LoRA has one rank")
    return ranks.pop()
