"""PEFT LoRA layers (what ``load_lora_weights`` and ``add_adapter`` create).

PEFT computes ``lora_B(lora_A(dropout(x))) * scaling``; the rank bottleneck is the
output of ``lora_A[adapter]``, so the mask is a forward hook on that module. Hooks
leave ``state_dict`` keys and ``forward`` untouched.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from . import MaskSite

__all__ = ["PeftBackend"]

#: Rank dimension of each ``lora_A`` module type's output.
_RANK_DIM = {nn.Linear: -1, nn.Conv1d: 1, nn.Conv2d: 1, nn.Conv3d: 1}


def _lora_layers(denoiser: nn.Module):
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    for name, module in denoiser.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


class PeftBackend:
    name = "peft"

    def active_adapters(self, denoiser: nn.Module) -> list[str]:
        names: dict[str, None] = {}
        for _, layer in _lora_layers(denoiser):
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A or adapter in layer.lora_embedding_A:
                    names[adapter] = None
        return list(names)

    def mask_sites(self, denoiser: nn.Module, adapters: Sequence[str], layout: str = "plain") -> list[MaskSite]:
        sites = []
        for name, layer in _lora_layers(denoiser):
            parent_name, _, attr = name.rpartition(".")
            parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
            for adapter in adapters:
                site = self._site(name, layer, adapter, layout, parent, attr)
                if site is not None:
                    sites.append(site)
        return sites

    def _site(
        self, name: str, layer: nn.Module, adapter: str, layout: str, parent: nn.Module, attr: str
    ) -> Optional[MaskSite]:
        where = f"{name} (adapter {adapter!r})"
        if adapter in layer.lora_embedding_A:
            raise ValueError(f"cannot mask {where}: T-LoRA masking supports Linear and Conv layers, not Embedding")
        if adapter not in layer.lora_A:
            return None
        reason = _unmaskable(layer, adapter)
        if reason:
            raise ValueError(f"cannot mask {where}: {reason}")
        lora_a = layer.lora_A[adapter]
        rank_dim = next((d for cls, d in _RANK_DIM.items() if type(lora_a) is cls), None)
        if rank_dim is None:
            raise ValueError(
                f"cannot mask {where}: its lora_A is a {type(lora_a).__name__}; "
                "supported: Linear, Conv1d, Conv2d, Conv3d"
            )

        def still_valid() -> Optional[str]:
            if getattr(parent, attr, None) is not layer:
                return f"the LoRA layer at {name} was unloaded or replaced (e.g. unload_lora_weights)"
            if adapter not in layer.lora_A or layer.lora_A[adapter] is not lora_a:
                return f"adapter {adapter!r} was deleted or replaced at {name}"
            return _unmaskable(layer, adapter)

        return MaskSite(where, adapter, lora_a, rank_dim, int(layer.r[adapter]), still_valid, layout, layer)


def _unmaskable(layer: nn.Module, adapter: str) -> Optional[str]:
    if adapter in getattr(layer, "merged_adapters", ()):
        return (
            "the LoRA is fused into the base weights (fuse_lora/merge_adapter); masked ranks cannot be "
            "removed from fused weights: call pipe.unfuse_lora() before patching"
        )
    if getattr(layer, "use_dora", {}).get(adapter, False):
        return "DoRA adapters are not supported: the magnitude vector depends on all ranks at once"
    if adapter in getattr(layer, "lora_variant", {}):
        variant = type(layer.lora_variant[adapter]).__name__
        return f"LoRA variant {variant} is not supported; only plain LoRA layers can be rank-masked"
    return None
