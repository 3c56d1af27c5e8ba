"""T-LoRA training: masked PEFT LoRAs (vanilla) and native ortho layers, and a DreamBooth trainer."""

from .ortho import add_ortho_tlora, export_ortho_peft, orthogonality_penalty, remove_ortho_tlora
from .targets import DEFAULT_TARGETS, resolve_targets
from .trainer import TrainConfig, TrainResult, train

__all__ = [
    "add_ortho_tlora",
    "remove_ortho_tlora",
    "export_ortho_peft",
    "orthogonality_penalty",
    "resolve_targets",
    "DEFAULT_TARGETS",
    "TrainConfig",
    "TrainResult",
    "train",
]
