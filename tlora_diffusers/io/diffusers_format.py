"""Our format and plain diffusers/PEFT LoRA files: ``unet.<module>.lora_A.weight`` keys.

Ours carries its T-LoRA config under the ``tlora_config`` metadata key (see
:mod:`tlora_diffusers.io.format`); a plain diffusers LoRA needs the schedule from the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from .common import NeedsInputError, default_lora_config, lora_rank, schedule_config
from .format import COMPONENT_PREFIXES, LORA_ADAPTER_METADATA_KEY, TLORA_METADATA_KEY, TLoRAFileMetadata, json_object
from .formats import ConvertedTLoRA, TLoRAFormat

__all__ = ["FORMAT", "split_component"]


def split_component(tensors: dict[str, torch.Tensor], path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    components = {k.split(".", 1)[0] for k in tensors}
    if not components <= set(COMPONENT_PREFIXES) or len(components) != 1:
        raise ValueError(
            f"{path}: expected every key to start with 'unet.' or 'transformer.' (one denoiser), got prefixes "
            f"{sorted(components)}"
        )
    component = components.pop()
    return component, {k.split(".", 1)[1]: v for k, v in tensors.items()}


def _adapter_config(metadata: dict[str, str], component: str, path: Path) -> Optional[dict[str, Any]]:
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if raw is None:
        return None
    packed = json_object(raw, str(path), f"'{LORA_ADAPTER_METADATA_KEY}'")
    prefix = component + "."
    return {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}


def _convert_diffusers(path, tensors, metadata, denoiser, cfg, *, min_rank: Optional[int] = None,
                       alpha: Optional[float] = None) -> ConvertedTLoRA:
    """Ours, or a plain diffusers LoRA: its schedule from ``cfg`` or ``min_rank=``/``alpha=`` (the rank is the file's)."""
    component, state_dict = split_component(tensors, path)
    rank = lora_rank(state_dict, path)
    lora_config = _adapter_config(metadata, component, path) or default_lora_config(state_dict, rank)
    lora_config.pop("base_model_name_or_path", None)
    if TLORA_METADATA_KEY in metadata:
        if min_rank is not None or alpha is not None:
            raise ValueError(f"{path} carries its T-LoRA config; min_rank=/alpha= are for files without one")
        meta = TLoRAFileMetadata.from_json(metadata[TLORA_METADATA_KEY], where=str(path))
        fmt = "tlora_diffusers"
    else:
        layout = cfg.layout if cfg is not None else "plain"  # a paired encoding cannot be told from the tensors
        schedule = schedule_config(path, rank // 2 if layout == "paired" else rank, layout, cfg, min_rank, alpha)
        if schedule is None:
            raise NeedsInputError(
                f"{path}: a plain LoRA file with no T-LoRA config in its metadata; pass cfg=TLoRAConfig(max_rank={rank}, "
                "min_rank=..., alpha=...) or min_rank=... (and alpha=..., default 1.0): the schedule it was trained with",
                "cfg", {"variant": "vanilla", "layout": "plain", "rank": rank, "lora_rank": rank, "config": "needs cfg",
                        "modules": sorted({k.rpartition(".lora_")[0] for k in state_dict}), "component": component},
            )
        meta = TLoRAFileMetadata(schedule, component=component, source_format="diffusers")
        fmt = "diffusers"
    if meta.component != component:
        raise ValueError(f"{path}: metadata says component {meta.component!r} but the keys are for {component!r}")
    if meta.config.lora_rank != rank:
        raise ValueError(
            f"{path}: metadata says max_rank={meta.config.max_rank} (layout {meta.config.layout!r}, LoRA rank "
            f"{meta.config.lora_rank}) but the tensors have rank {rank}"
        )
    if lora_config.get("r", rank) != rank:
        raise ValueError(f"{path}: adapter metadata says r={lora_config.get('r')} but the tensors have rank {rank}")
    return ConvertedTLoRA(state_dict, lora_config, meta, fmt)


def _is_diffusers(keys: list[str], metadata: dict[str, str]) -> bool:
    return bool(keys) and all(k.split(".", 1)[0] in COMPONENT_PREFIXES and ".lora_" in k for k in keys)


FORMAT = TLoRAFormat(
    "tlora_diffusers",
    "diffusers/PEFT LoRA safetensors: unet.<module>.lora_A.weight, with or without tlora_config metadata",
    _is_diffusers,
    _convert_diffusers,
)
