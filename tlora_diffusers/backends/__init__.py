"""Layer backends: where each kind of LoRA layer carries its rank bottleneck.

A backend finds the layers of one LoRA implementation (PEFT, the native ortho layers,
...) in a denoiser and returns :class:`MaskSite`s: the module that applies the mask.
``install(site, slot, tokenwise)`` makes that module read the denoiser's slot;
``uninstall(site)`` undoes it exactly. Layers a backend recognises but cannot mask
(fused weights, DoRA, embeddings) are refused with an error, never skipped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import torch
import torch.nn as nn

from ..config import TLoRAConfig

__all__ = ["MaskSite", "LayerBackend", "register_layer_backend", "layer_backends", "find_mask_sites",
           "active_adapters", "loaded_adapters", "backend_of"]


@dataclass(frozen=True)
class MaskSite:
    """One place the mask is applied: ``module``'s output along ``rank_dim`` (or its weight rows).

    ``stale_reason()`` returns ``None`` while the site can be masked, else why it cannot any
    more (the adapter was fused or deleted after patching). ``rank`` is the LoRA rank of the
    layer (padded ranks included); ``groupable`` sites can run in ``WEIGHTS`` mode;
    ``layer`` is the backend's own layer object (opaque to the core).
    """

    name: str
    adapter: str
    module: nn.Module
    rank_dim: int
    rank: int
    stale_reason: Callable[[], Optional[str]]
    layer: Optional[nn.Module] = None
    path: str = ""
    groupable: bool = False
    backend: str = "peft"


class LayerBackend(Protocol):
    """Finds and masks the LoRA layers of one implementation."""

    name: str

    def active_adapters(self, denoiser: nn.Module) -> list[str]:
        """Adapters that run in the denoiser's forward now, in a stable order."""

    def loaded_adapters(self, denoiser: nn.Module) -> list[str]:
        """Every adapter the denoiser holds, active or not."""

    def mask_sites(self, denoiser: nn.Module, adapters: Sequence[str]) -> list[MaskSite]:
        """Sites for ``adapters``; raises ``ValueError`` for layers that cannot be masked."""

    def running_adapters(self, site: MaskSite) -> list[str]:
        """Adapters the site's layer runs in its forward right now (for the staleness check)."""

    def check_schedules(self, sites: Sequence[MaskSite], configs: Mapping[str, TLoRAConfig], where: str) -> None:
        """Refuse or warn about adapter settings this kind of layer cannot mask exactly (at patch time)."""

    def install(self, site: MaskSite, slot: Any, tokenwise: bool) -> None:
        """Make ``site.module`` apply the masks of ``slot`` (idempotent)."""

    def uninstall(self, site: MaskSite) -> None:
        """Undo :meth:`install` exactly."""


_BACKENDS: list[LayerBackend] = []
_GUARD = threading.Lock()
_LOADED = False


def _load_builtins() -> None:
    global _LOADED
    with _GUARD:
        if _LOADED:
            return
        _LOADED = True
        from .native import NativeBackend
        from .peft import PeftBackend

        _BACKENDS[:0] = [PeftBackend(), NativeBackend()]


def register_layer_backend(backend: LayerBackend, *, replace: bool = False) -> None:
    """Add a backend (asked after the built-ins); a name already registered needs ``replace=True``."""
    _load_builtins()
    for method in ("active_adapters", "loaded_adapters", "mask_sites", "running_adapters", "check_schedules",
                   "install", "uninstall"):
        if not callable(getattr(backend, method, None)):
            raise TypeError(f"a layer backend needs a {method}() method; {type(backend).__name__} has none")
    with _GUARD:
        same = [i for i, b in enumerate(_BACKENDS) if b.name == backend.name]
        if same and not replace:
            raise ValueError(f"a layer backend named {backend.name!r} is already registered; pass replace=True")
        if same:
            _BACKENDS[same[0]] = backend
        else:
            _BACKENDS.append(backend)


def layer_backends() -> list[LayerBackend]:
    _load_builtins()
    return list(_BACKENDS)


def backend_of(site: MaskSite) -> LayerBackend:
    return next(b for b in layer_backends() if b.name == site.backend)


def active_adapters(denoiser: nn.Module) -> list[str]:
    """Every active adapter any backend finds, in a stable order."""
    return list(dict.fromkeys(a for b in layer_backends() for a in b.active_adapters(denoiser)))


def loaded_adapters(denoiser: nn.Module) -> list[str]:
    return list(dict.fromkeys(a for b in layer_backends() for a in b.loaded_adapters(denoiser)))


def find_mask_sites(
    denoiser: nn.Module, configs: Mapping[str, TLoRAConfig], denoiser_name: str
) -> list[MaskSite]:
    """All mask sites of the adapters in ``configs``, with each adapter's rank checked against its config.

    A LoRA padded to a larger rank (``pipe.enable_lora_hotswap(target_rank=...)``) is accepted
    when the padding rows of ``lora_A`` are exactly zero: those ranks are always masked.
    """
    sites = [s for b in layer_backends() for s in b.mask_sites(denoiser, list(configs))]
    for backend in layer_backends():
        backend.check_schedules([s for s in sites if s.backend == backend.name], configs, denoiser_name)
    found = {s.adapter for s in sites}
    missing = [a for a in configs if a not in found]
    if missing:
        available = sorted(loaded_adapters(denoiser))
        raise ValueError(
            f"adapter(s) {missing} have no LoRA layers in {denoiser_name}; adapters found: {available or 'none'}"
        )
    for adapter, cfg in configs.items():
        mine = [s for s in sites if s.adapter == adapter]
        ranks = sorted({s.rank for s in mine})
        if len(ranks) != 1:
            raise ValueError(
                f"adapter {adapter!r} has layers of different ranks {ranks} in {denoiser_name}; a T-LoRA masks one "
                "rank schedule, so every layer needs the same rank"
            )
        rank = ranks[0]
        need = cfg.lora_rank
        if rank == need:
            continue
        paired = " with layout='paired' (LoRA rank 2*max_rank)" if cfg.layout == "paired" else ""
        if rank > need and all(_zero_rows(s, need) for s in mine):
            continue
        raise ValueError(
            f"adapter {adapter!r} has rank {rank} at {mine[0].name} but its TLoRAConfig max_rank={cfg.max_rank}"
            f"{paired} needs rank {need}; use the adapter's rank as max_rank, or pass adapter_names=[...] to mask "
            "only the T-LoRA adapters"
        )
    return sites


@torch.no_grad()
def _zero_rows(site: MaskSite, keep: int) -> bool:
    """The ranks beyond ``keep`` are padding (exactly zero ``lora_A`` rows)."""
    weight = getattr(site.module, "weight", None)
    if weight is None or weight.is_meta:
        return False
    return bool((weight[keep:] == 0).all())
