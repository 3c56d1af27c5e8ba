"""The T-LoRA rank schedule as pure tensor functions (no model, no host sync)."""

from __future__ import annotations

import math
from numbers import Real
from typing import Union

import torch

from .config import TLoRAConfig

__all__ = ["active_rank", "rank_mask", "lora_rank_mask", "as_timesteps"]

Timesteps = Union[int, float, torch.Tensor]


def as_timesteps(timesteps: Timesteps, *, name: str = "timesteps") -> torch.Tensor:
    """Validate and convert timesteps to a 0-d, 1-d (per sample) or 2-d (per sample and token) real tensor.

    Python numbers become CPU tensors. Shape, dtype and emptiness are checked on the
    host (metadata only); finiteness is checked without a device-to-host sync: on the
    CPU directly, on CUDA with a device-side assert.
    """
    if isinstance(timesteps, bool) or (
        not isinstance(timesteps, torch.Tensor) and not isinstance(timesteps, Real)
    ):
        raise TypeError(
            f"{name} must be a number or a 0-d/1-d tensor, got {type(timesteps).__name__}"
        )
    if not isinstance(timesteps, torch.Tensor):
        if not math.isfinite(timesteps):
            raise ValueError(f"{name} must be finite: a T-LoRA has no rank at t={timesteps!r}")
        return torch.tensor(timesteps, dtype=torch.float64)
    t = timesteps
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must have a real dtype (int or float), got {t.dtype}")
    if t.ndim > 2:
        raise ValueError(
            f"{name} must be 0-d, 1-d (one per sample) or 2-d (one per sample and token), got shape {tuple(t.shape)}"
        )
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        _check_finite(t, name)
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    message = f"{name} must be finite: a T-LoRA has no rank at t=nan or t=inf"
    if t.device.type == "cpu":
        if not bool(torch.isfinite(t).all()):
            raise ValueError(message)
    elif not torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(t).all(), message)


def _schedule_dtype(device: torch.device) -> torch.dtype:
    # float64 reproduces the reference's Python-float arithmetic bit for bit; MPS has none.
    return torch.float32 if device.type == "mps" else torch.float64


def active_rank(
    timesteps: Timesteps, cfg: TLoRAConfig, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """Number of active ranks, ``floor(((T - t) / T) ** alpha * (max_rank - min_rank)) + min_rank``.

    Paper eq. 6 with ``t`` clamped to ``[0, T]``; returns an int64 tensor of the
    timesteps' shape on their device.

    Example:
        >>> active_rank(torch.tensor([0, 250, 500, 750, 999]), TLoRAConfig(64)).tolist()
        [64, 48, 32, 16, 1]
    """
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
    t = as_timesteps(timesteps)
    T = float(num_train_timesteps)
    t = t.to(_schedule_dtype(t.device)).clamp(0.0, T)
    frac = (T - t) / T
    if cfg.alpha != 1.0:
        frac = frac.pow(cfg.alpha)
    span = cfg.max_rank - cfg.min_rank
    return torch.floor(frac * span).to(torch.int64) + cfg.min_rank


def rank_mask(
    timesteps: Timesteps,
    cfg: TLoRAConfig,
    num_train_timesteps: int = 1000,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Binary mask of shape ``(*timesteps.shape, max_rank)``: the first ``active_rank`` entries are 1.

    This is the schedule's mask; :func:`lora_rank_mask` expands it to a paired layout.

    Example:
        >>> rank_mask(500, TLoRAConfig(4, min_rank=0)).tolist()
        [1.0, 1.0, 0.0, 0.0]
    """
    r = active_rank(timesteps, cfg, num_train_timesteps)
    ranks = torch.arange(cfg.max_rank, device=r.device)
    return (ranks < r.unsqueeze(-1)).to(dtype)


def lora_rank_mask(
    timesteps: Timesteps,
    cfg: TLoRAConfig,
    num_train_timesteps: int = 1000,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Mask over the LoRA's ``cfg.lora_rank`` ranks: :func:`rank_mask`, each entry twice if paired."""
    mask = rank_mask(timesteps, cfg, num_train_timesteps, dtype)
    return mask.repeat_interleave(2, dim=-1) if cfg.layout == "paired" else mask
