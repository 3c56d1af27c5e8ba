"""Per-call mask state, kept in a ContextVar so it belongs to one call in one thread.

Nothing here is process-global: two threads (or two pipelines sharing a denoiser)
each see only the mask of the denoiser call they are running.
"""

from __future__ import annotations

import contextvars
from typing import Any, Optional

import torch

__all__ = ["CallMask", "current_call", "use_call"]

_CURRENT: contextvars.ContextVar[Optional["CallMask"]] = contextvars.ContextVar("tlora_call", default=None)


class CallMask:
    """The rank mask of one denoiser call; converted once per (device, dtype, layout).

    ``mask`` is ``(R,)`` for a timestep shared by the batch or ``(B, R)`` per sample.
    """

    __slots__ = ("owner", "module", "mask", "batch", "_views", "token", "hits")

    def __init__(self, owner: Any, module: torch.nn.Module, mask: torch.Tensor) -> None:
        self.owner = owner
        self.module = module
        self.mask = mask
        self.batch = mask.shape[0] if mask.ndim == 2 and mask.shape[0] != 1 else None
        self._views: dict[tuple, torch.Tensor] = {}
        self.token: Optional[contextvars.Token] = None
        self.hits = 0  # masked layer calls: zero means nothing was masked (fused? unloaded?)

    def view_for(self, output: torch.Tensor, rank_dim: int, where: str, paired: bool = False) -> torch.Tensor:
        """The mask on ``output``'s device and dtype, shaped to broadcast over ``rank_dim``.

        ``paired``: LoRA ranks 2i and 2i+1 both take schedule rank i.
        """
        self.hits += 1
        key = (output.device, output.dtype, output.ndim, rank_dim, paired)
        view = self._views.get(key)
        if view is None:
            view = self._make_view(output, rank_dim, where, paired)
            self._views[key] = view
        if self.batch is not None and output.shape[0] != self.batch:
            raise ValueError(
                f"T-LoRA layer {where} received a batch of {output.shape[0]} but the denoiser call has "
                f"{self.batch} per-sample timesteps; pass one timestep per sample or a single timestep"
            )
        return view

    def _make_view(self, output: torch.Tensor, rank_dim: int, where: str, paired: bool) -> torch.Tensor:
        rank = self.mask.shape[-1] * (2 if paired else 1)
        if output.shape[rank_dim] != rank:
            raise ValueError(
                f"T-LoRA layer {where} has rank {output.shape[rank_dim]} but the mask has {rank} ranks"
            )
        if self.mask.ndim == 2 and output.ndim < 2:
            raise ValueError(f"T-LoRA layer {where} got an unbatched input with per-sample timesteps")
        return broadcast_mask(self.mask, output, rank_dim, paired)


def broadcast_mask(mask: torch.Tensor, output: torch.Tensor, rank_dim: int, paired: bool) -> torch.Tensor:
    """``mask`` (R,) or (B, R) on ``output``'s device/dtype, shaped to multiply ``output`` along ``rank_dim``."""
    mask = mask.to(device=output.device, dtype=output.dtype, non_blocking=True)
    if paired:
        mask = mask.repeat_interleave(2, dim=-1)
    shape = [1] * output.ndim
    shape[rank_dim] = mask.shape[-1]
    if mask.ndim == 2:  # batch first
        shape[0] = mask.shape[0]
        return mask.reshape(shape)
    return mask.reshape(shape[rank_dim % output.ndim:])


def current_call() -> Optional[CallMask]:
    """The mask state of the denoiser call running in this context, if any."""
    return _CURRENT.get()


class use_call:
    """Run a block with ``call`` as the active mask state (restored on any exit)."""

    def __init__(self, call: Optional[CallMask]) -> None:
        self.call = call

    def __enter__(self) -> Optional[CallMask]:
        self._token = _CURRENT.set(self.call)
        return self.call

    def __exit__(self, *exc: Any) -> None:
        _CURRENT.reset(self._token)
