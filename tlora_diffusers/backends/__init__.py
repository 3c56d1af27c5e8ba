"""Layer backends: where each kind of LoRA layer carries its rank bottleneck.

A backend finds the layers of one LoRA implementation (PEFT, ...) in a denoiser and
returns :class:`MaskSite`s: the module whose output has the rank dimension. Layers a
backend recognises but cannot mask (fused weights, DoRA, embeddings) are refused
with an error, never skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch.nn as nn

from ..config import TLoRAConfig

__all__ = ["MaskSite", "LayerBackend", "register_layer_backend", "find_mask_sites", "layer_backends"]


@dataclass(frozen=True)
class MaskSite:
    """One place the mask is applied: ``module``'s output, multiplied along ``rank_dim``.

    ``still_valid`` returns ``None`` while the site can be masked, else the reason it
    cannot any more (e.g. the adapter was fused or deleted after patching). ``layout``
    ``"paired"`` means two consecutive ranks share one schedule rank.
    """

    name: str
    adapter: str
    module: nn.Module
    rank_dim: int
    rank: int
    still_valid: Callable[[], Optional[str]]
    layout: str = "plain"
    #: The PEFT ``LoraLayer`` holding this site (``None`` for other backends): the fast path merges through it.
    peft_layer: Optional[nn.Module] = None

    @property
    def schedule_rank(self) -> int:
        return self.rank // 2 if self.layout == "paired" else self.rank


class LayerBackend(Protocol):
    """Finds the maskable LoRA layers of one implementation."""

    name: str

    def active_adapters(self, denoiser: nn.Module) -> list[str]:
        """Adapters this backend would mask by default, in a stable order."""

    def mask_sites(self, denoiser: nn.Module, adapters: Sequence[str], layout: str = "plain") -> list[MaskSite]:
        """Sites for ``adapters`` (``layout`` from the config, for layers that cannot tell);
        raises ``ValueError`` for layers that cannot be masked."""


_BACKENDS: list[LayerBackend] = []


def register_layer_backend(backend: LayerBackend) -> None:
    """Add a backend; later backends are asked after earlier ones."""
    if any(b.name == backend.name for b in _BACKENDS):
        raise ValueError(f"a layer backend named {backend.name!r} is already registered")
    _BACKENDS.append(backend)


def layer_backends() -> list[LayerBackend]:
    return list(_BACKENDS)


def active_adapters(denoiser: nn.Module) -> list[str]:
    """Every active adapter any backend finds, in a stable order."""
    return list(dict.fromkeys(a for b in _BACKENDS for a in b.active_adapters(denoiser)))


def find_mask_sites(
    denoiser: nn.Module, adapter_names: Optional[Sequence[str]], cfg: TLoRAConfig, denoiser_name: str
) -> tuple[list[str], list[MaskSite]]:
    """All mask sites of ``adapter_names`` (default: every active adapter) with their rank checked."""
    available = active_adapters(denoiser)
    if adapter_names is None:
        adapters = available
        if not adapters:
            raise ValueError(
                f"{denoiser_name} has no LoRA layers to mask: load a LoRA first "
                "(pipe.load_lora_weights(...) or denoiser.add_adapter(LoraConfig(...))); "
                f"backends searched: {', '.join(b.name for b in _BACKENDS)}"
            )
    else:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        adapters = list(dict.fromkeys(adapter_names))
        if not adapters:
            raise ValueError("adapter_names must name at least one adapter, got an empty list")
    sites = [s for b in _BACKENDS for s in b.mask_sites(denoiser, adapters, cfg.layout)]
    found = {s.adapter for s in sites}
    missing = [a for a in adapters if a not in found]
    if missing:
        raise ValueError(
            f"adapter(s) {missing} have no LoRA layers in {denoiser_name}; "
            f"adapters found: {sorted(set(available)) or 'none'}"
        )
    wrong = [s for s in sites if s.rank != cfg.max_rank * (2 if s.layout == "paired" else 1)]
    if wrong:
        s = wrong[0]
        expected = f"max_rank={cfg.max_rank}" + (" with layout='paired' (LoRA rank 2*max_rank)" if s.layout == "paired" else "")
        raise ValueError(
            f"adapter {s.adapter!r} has rank {s.rank} at {s.name} ({len(wrong)} layer(s) differ), "
            f"but TLoRAConfig {expected} needs rank {cfg.max_rank * (2 if s.layout == 'paired' else 1)}; use the "
            "adapter's rank as max_rank or pass adapter_names=[...] to mask only the T-LoRA adapters"
        )
    return adapters, sites


from .native import NativeBackend  # noqa: E402
from .peft import PeftBackend  # noqa: E402

register_layer_backend(PeftBackend())
register_layer_backend(NativeBackend())
