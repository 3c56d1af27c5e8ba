"""The fast path: merge only the ranks that become active into the base weights.

T-LoRA's active ranks are nested (the first r), and over a sampling run r only grows as
t falls. So instead of running the LoRA branch on every call, the base weight of each
adapted layer gets ``scaling · B[:, lo:hi] · A[lo:hi]`` added when the rank grows from
``lo`` to ``hi`` and the LoRA branch is switched off: a call costs what the base model
costs, plus one full merge amortised over the run. The base weights are saved before
the first merge and copied back, bit for bit, when the run ends (also on exceptions),
when the rank would shrink, or when a call has per-sample timesteps (which fall back to
the mask path).
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .backends import MaskSite

__all__ = ["FastMerge", "fast_path_blocker"]

_RUNNING: "dict[int, threading.Lock]" = {}
_RUNNING_GUARD = threading.Lock()


def fast_path_blocker(sites: Sequence[MaskSite], adapters: Sequence[str]) -> Optional[str]:
    """Why these sites cannot use the fast path (``None`` if they can)."""
    for site in sites:
        layer = site.peft_layer
        if layer is None:
            return f"{site.name} is not a PEFT LoRA layer"
        base = layer.get_base_layer()
        if not isinstance(base, (nn.Linear, nn.Conv2d)) or type(layer.lora_A[site.adapter]) not in (nn.Linear, nn.Conv2d):
            return f"{site.name}: only Linear and Conv2d layers are merged"
        if base.weight.device.type == "meta" or hasattr(base, "_hf_hook") or hasattr(base, "_diffusers_hook"):
            return f"{site.name}: its weights are offloaded"
        if getattr(layer, "lora_bias", {}).get(site.adapter, False):
            return f"{site.name}: LoRA bias is not merged"
        others = [a for a in layer.active_adapters if a in layer.lora_A and a not in adapters]
        if others:
            return f"{site.name}: other active adapters {others} would be switched off"
    return None


class FastMerge:
    """One pipeline run's merged state (use as a context manager around the run)."""

    def __init__(self, owner: object, sites: Sequence[MaskSite], denoiser: nn.Module) -> None:
        self.owner = owner
        self.sites = list(sites)
        self.layers = list({id(s.peft_layer): s.peft_layer for s in sites}.values())
        self.denoiser = denoiser
        self.rank = 0
        self.runtime_off = False
        self._saved: dict[int, torch.Tensor] = {}
        self._active: dict[int, object] = {}
        self._lock: Optional[threading.Lock] = None

    def __enter__(self) -> "FastMerge":
        with _RUNNING_GUARD:
            lock = _RUNNING.setdefault(id(self.denoiser), threading.Lock())
        if not lock.acquire(blocking=False):
            raise RuntimeError(
                "another fast=True run is merging into this denoiser's weights (another thread?); fast=True "
                "excludes concurrent use of one denoiser: use the mask path (fast=False) for concurrent runs"
            )
        self._lock = lock
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.restore()
        finally:
            if self._lock is not None:
                self._lock.release()

    @torch.no_grad()
    def merge_to(self, rank: int) -> None:
        """Make the base weights hold the first ``rank`` schedule ranks and switch the LoRA branch off."""
        if rank < self.rank:
            self._restore_weights()
        lo, hi = self.rank, rank
        if hi > lo:
            rewritten: set[int] = set()
            for site in self.sites:
                self._add(site, lo, hi, rewritten)
        self.rank = rank
        if not self.runtime_off:
            for layer in self.layers:
                self._active[id(layer)] = layer._active_adapter
                layer._active_adapter = []
            self.runtime_off = True

    def _add(self, site: MaskSite, lo: int, hi: int, rewritten: set[int]) -> None:
        """Add ranks ``lo:hi`` to the base weight with one GEMM (``addmm``), no temporaries.

        float32/64 weights grow in place by the new ranks only. Half-precision weights are
        rewritten as ``saved + B[:, :hi] @ A[:hi]`` so they are rounded once, like ``fuse_lora``,
        instead of once per step; further adapters on the same layer then add in place.
        """
        layer = site.peft_layer
        base = layer.get_base_layer().weight
        if id(base) not in self._saved:
            self._saved[id(base)] = base.detach().clone()
        if site.layout == "paired":
            lo, hi = 2 * lo, 2 * hi
        w = base.view(base.shape[0], -1)
        a = layer.lora_A[site.adapter].weight
        b = layer.lora_B[site.adapter].weight
        a = a.reshape(a.shape[0], -1).to(base.dtype)
        b = b.reshape(b.shape[0], -1).to(base.dtype)
        scaling = layer.scaling[site.adapter]
        if base.dtype in (torch.float32, torch.float64):
            w.addmm_(b[:, lo:hi], a[lo:hi], alpha=scaling)
        elif id(base) in rewritten:  # a second masked adapter on this layer
            w.addmm_(b[:, :hi], a[:hi], alpha=scaling)
        else:
            rewritten.add(id(base))
            saved = self._saved[id(base)].view_as(w)
            torch.addmm(saved, b[:, :hi], a[:hi], alpha=scaling, out=w)

    @torch.no_grad()
    def _restore_weights(self) -> None:
        for site in self.sites:
            base = site.peft_layer.get_base_layer().weight
            saved = self._saved.get(id(base))
            if saved is not None:
                base.copy_(saved)
        self._saved.clear()
        self.rank = 0

    def restore(self) -> None:
        """Base weights back bit for bit, LoRA branch back on (for per-sample calls and the run's end)."""
        self._restore_weights()
        if self.runtime_off:
            for layer in self.layers:
                layer._active_adapter = self._active.pop(id(layer))
            self.runtime_off = False
