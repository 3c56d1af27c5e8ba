"""T-LoRA training: masked PEFT LoRAs (vanilla) and native ortho layers, and a DreamBooth trainer.

Names are imported on first use, so ``import tlora_diffusers.training`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "add_ortho_tlora": "ortho", "remove_ortho_tlora": "ortho", "export_ortho_peft": "ortho",
    "orthogonality_penalty": "ortho", "resolve_targets": "targets", "default_targets": "targets",
    "recipe_for": "recipes",
    "TrainConfig": "trainer", "TrainResult": "trainer", "train": "trainer", "Recipe": "recipe",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tlora_diffusers.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
