"""Gradient checkpointing that recomputes with the call's mask.

diffusers runs checkpointed blocks through ``module._gradient_checkpointing_func`` (a
private attribute set by ``enable_gradient_checkpointing``; this is the one module that
reads it, and ``tests/test_training_masks.py`` fails if diffusers renames it).
Recomputation runs during ``backward``, after the denoiser call and its mask have ended;
the wrapper binds each block to the mask of the call that ran it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.nn as nn

from .slot import DenoiserSlot

__all__ = ["wrap_checkpointing", "unwrap_checkpointing", "CHECKPOINT_ATTR"]

CHECKPOINT_ATTR = "_gradient_checkpointing_func"


class _MaskedCheckpointing:
    __slots__ = ("inner", "slot")

    def __init__(self, inner: Any, slot: DenoiserSlot) -> None:
        self.inner, self.slot = inner, slot

    def __call__(self, block: nn.Module, *args: Any) -> Any:
        if self.slot.mode is None:
            return self.inner(block, *args)
        return self.inner(_BlockWithMask(block, self.slot, self.slot.mode, self.slot.call), *args)


class _BlockWithMask:
    """A checkpointed block bound to one call's slot state (forward and recompute alike)."""

    __slots__ = ("block", "slot", "mode", "call")

    def __init__(self, block: nn.Module, slot: DenoiserSlot, mode: Any, call: Any) -> None:
        self.block, self.slot, self.mode, self.call = block, slot, mode, call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        slot = self.slot
        saved = slot.mode, slot.call
        slot.mode, slot.call = self.mode, self.call
        try:
            return self.block(*args, **kwargs)
        finally:
            slot.mode, slot.call = saved

    def __getattr__(self, name: str) -> Any:
        return getattr(self.block, name)


def wrap_checkpointing(modules: Sequence[nn.Module], slot: DenoiserSlot) -> None:
    for module in modules:
        inner = module.__dict__.get(CHECKPOINT_ATTR)
        if inner is not None and not isinstance(inner, _MaskedCheckpointing):
            module.__dict__[CHECKPOINT_ATTR] = _MaskedCheckpointing(inner, slot)


def unwrap_checkpointing(denoiser: nn.Module) -> None:
    for module in denoiser.modules():
        inner = module.__dict__.get(CHECKPOINT_ATTR)
        if isinstance(inner, _MaskedCheckpointing):
            module.__dict__[CHECKPOINT_ATTR] = inner.inner
