"""tlora_diffusers: T-LoRA (timestep-dependent LoRA rank masking) on stock diffusers pipelines.

The public API is listed in ``__all__``; each name is imported on first use (PEP 562), so
``import tlora_diffusers`` stays light and never imports a diffusers model or pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "TLoRAConfig": "config",
    "TLoRAPatch": "patch",
    "load_tlora": "io",
    "read_tlora": "io",
    "save_tlora": "io",
    "inspect_tlora": "io",
    "convert_tlora": "io",
    "read_schedule": "io",
    "LoadedTLoRA": "io",
    "TLoRAFileMetadata": "io",
    "TLoRAReport": "io",
    "active_rank": "schedule",
    "rank_mask": "schedule",
    "lora_rank_mask": "schedule",
    "ModelFamily": "models",
    "register_model_family": "models",
    "model_families": "models",
    "supported_models": "models",
    "conventions": "models",
    "LayerBackend": "backends",
    "MaskSite": "backends",
    "register_layer_backend": "backends",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .backends import LayerBackend, MaskSite, register_layer_backend
    from .config import TLoRAConfig
    from .io import (LoadedTLoRA, TLoRAFileMetadata, TLoRAReport, convert_tlora, inspect_tlora, load_tlora,
                     read_schedule, read_tlora, save_tlora)
    from .models import ModelFamily, conventions, model_families, register_model_family, supported_models
    from .patch import TLoRAPatch
    from .schedule import active_rank, lora_rank_mask, rank_mask


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tlora_diffusers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
