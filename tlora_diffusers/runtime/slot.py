"""The per-denoiser slot that masked layers read, and the masks of one denoiser call.

A patched denoiser owns one :class:`DenoiserSlot`. Its pre-hook fills the slot for the
call and its post-hook empties it; every masked layer reads the slot in its own
``forward`` (no hook per layer). Two modes:

* ``WEIGHTS`` (inference with one timestep for the batch): each layer multiplies by its
  ``lora_A`` weight *pre-masked for this call* (one multiply per group of equally shaped
  layers, done by the pre-hook), so the per-call host work does not grow with depth;
* ``OUTPUTS`` (per-sample or per-token timesteps, training): each layer multiplies its
  ``lora_A`` output by the call's mask, so masked ranks get exactly zero gradient.

Calls of one denoiser are serialised by the slot's lock, so threads and pipelines that
share a denoiser each run with their own mask (diffusers runs one denoiser call at a
time per device anyway).
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from .layer import LAYER_ATTR, LayerMask

__all__ = ["WEIGHTS", "OUTPUTS", "DenoiserSlot", "CallMasks", "broadcast_mask", "mask_output"]

WEIGHTS = "weights"
OUTPUTS = "outputs"


class CallMasks:
    """Masks of one denoiser call, per adapter, in LoRA-rank space.

    ``masks[adapter]`` is ``(R,)`` for a timestep shared by the batch or ``(B, R)`` per
    sample (for per-token calls: each sample's largest timestep). ``token_masks[adapter]``
    is ``(B, seq, R)`` for per-token calls. ``groups[arg][adapter]``: the masks of layers
    that follow another timestep argument of the call (see :class:`~.layer.LayerMask`).
    """

    __slots__ = ("masks", "token_masks", "groups", "batch", "seq", "where", "_views")

    def __init__(self, masks: dict[str, torch.Tensor], token_masks: Optional[dict[str, torch.Tensor]] = None,
                 where: str = "denoiser", groups: Optional[dict[str, dict[str, torch.Tensor]]] = None) -> None:
        self.masks = masks
        self.token_masks = token_masks
        self.groups = groups or {}
        some = next(iter(masks.values()))
        self.batch = some.shape[0] if some.ndim == 2 and some.shape[0] != 1 else None
        self.seq = next(iter(token_masks.values())).shape[1] if token_masks else None
        self.where = where
        self._views: dict[tuple, torch.Tensor] = {}

    def view_for(self, state: LayerMask, output: torch.Tensor, cache: bool = True) -> torch.Tensor:
        """The mask for a layer's output: on its device and dtype, broadcastable along its rank dim.

        ``cache=False`` (inside a traced graph): the same mask, per-token and per-group included, without the
        per-call cache.
        """
        group = state.group if state.group in self.groups else None
        tokenwise = state.tokenwise and self.token_masks is not None and group is None
        rows = output.shape[1] if tokenwise and output.ndim > 1 else 0
        key = (state.adapter, output.device, output.dtype, output.ndim, state.rank_dim, tokenwise, rows, group)
        view = self._views.get(key) if cache else None
        if view is None:
            view = self._make_view(state, output, tokenwise, group)
            if cache:
                self._views[key] = view
        if self.batch is not None and output.shape[0] != self.batch and group is None:
            raise ValueError(
                f"T-LoRA layer {state.name} received a batch of {output.shape[0]} but the {self.where} call "
                f"has {self.batch} per-sample timesteps; pass one timestep per sample or a single timestep"
            )
        if tokenwise and output.shape[1] != self.seq and not (state.tokenwise == "frames" and rows % self.seq == 0):
            raise ValueError(
                f"T-LoRA layer {state.name} is a token layer of its model family but its output has "
                f"{output.shape[1]} rows where the {self.where} call has {self.seq} per-token timesteps"
            )
        return view

    def _make_view(self, state: LayerMask, output: torch.Tensor, tokenwise: bool, group: Optional[str]) -> torch.Tensor:
        masks = self.groups[group] if group is not None else self.token_masks if tokenwise else self.masks
        mask = masks[state.adapter]
        if output.shape[state.rank_dim] != mask.shape[-1]:
            raise ValueError(
                f"T-LoRA layer {state.name} has rank {output.shape[state.rank_dim]} but its mask has "
                f"{mask.shape[-1]} ranks"
            )
        if mask.ndim >= 2 and output.ndim < 2:
            raise ValueError(f"T-LoRA layer {state.name} got an unbatched input with per-sample timesteps")
        if tokenwise:
            if output.ndim != 3 or state.rank_dim % output.ndim != 2:
                raise ValueError(
                    f"T-LoRA layer {state.name}: per-token masks need (batch, tokens, rank) outputs, got "
                    f"shape {tuple(output.shape)}"
                )
            if output.shape[1] != mask.shape[1] and state.tokenwise == "frames" and output.shape[1] % mask.shape[1] == 0:
                # one timestep per latent frame; the layer's rows are the frames' tokens, frame-major
                mask = mask.repeat_interleave(output.shape[1] // mask.shape[1], dim=1)
            return mask.to(device=output.device, dtype=output.dtype, non_blocking=True)
        return broadcast_mask(mask, output, state.rank_dim)


def broadcast_mask(mask: torch.Tensor, output: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """``mask`` (R,) or (B, R) on ``output``'s device/dtype, shaped to multiply ``output`` along ``rank_dim``."""
    mask = mask.to(device=output.device, dtype=output.dtype, non_blocking=True)
    shape = [1] * output.ndim
    shape[rank_dim] = mask.shape[-1]
    if mask.ndim == 2:  # batch first
        shape[0] = mask.shape[0]
        return mask.reshape(shape)
    return mask.reshape(shape[rank_dim % output.ndim:])


def mask_output(module: Any, out: torch.Tensor) -> torch.Tensor:
    """``out`` times the current call's mask for ``module`` (a masked layer in ``OUTPUTS`` mode)."""
    state: LayerMask = module.__dict__[LAYER_ATTR]
    call = state.slot.call
    if torch.compiler.is_compiling():  # no caching inside a traced graph; per-token and group masks as eagerly
        return out * call.view_for(state, out, cache=False)
    view = call.view_for(state, out)
    # In place at inference (no new activation tensor); out of place when autograd records it.
    return out * view if out.requires_grad else out.mul_(view)


class DenoiserSlot:
    """What the masked layers of one denoiser read during a call (``mode``, ``call``).

    Not process-global: one per denoiser. ``acquire``/``release`` bracket a call under the
    slot's lock; a thread that re-enters while it still holds the lock (its previous
    call was interrupted by ``KeyboardInterrupt``, which skips PyTorch's always-call
    hooks) takes the slot over instead of deadlocking.
    """

    __slots__ = ("mode", "call", "name", "_lock", "_owner", "__weakref__")

    def __init__(self, name: str) -> None:
        self.mode: Optional[str] = None
        self.call: Optional[CallMasks] = None
        self.name = name
        self._lock = threading.Lock()
        self._owner: Optional[int] = None

    def acquire(self) -> None:
        me = threading.get_ident()
        if self._owner == me:  # a previous call of this thread never reached its post-hook
            self.mode = self.call = None
            return
        self._lock.acquire()
        self._owner = me

    def release(self) -> None:
        # Only the thread that holds the slot empties it: a call of another thread that failed before acquiring
        # it (PyTorch still runs the always-call post-hook) must not unmask the owner's call in flight.
        if self._owner == threading.get_ident():
            self.mode = self.call = None
            self._owner = None
            self._lock.release()

    def __deepcopy__(self, memo: dict) -> "DenoiserSlot":
        return DenoiserSlot(self.name)

    def __reduce__(self):
        return (DenoiserSlot, (self.name,))
