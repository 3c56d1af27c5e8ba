"""T-LoRA files: our self-describing format, and loaders for the formats in the wild."""

from .format import (
    TLORA_METADATA_KEY,
    WEIGHT_NAME,
    TLoRAFileMetadata,
    atomic_save_safetensors,
    read_tlora_metadata,
    save_tlora,
)
from .inspect import convert_tlora, inspect_tlora
from .load import LoadedTLoRA, TLoRAFormat, detect_format, load_tlora, read_tlora, register_format

__all__ = [
    "TLORA_METADATA_KEY",
    "WEIGHT_NAME",
    "TLoRAFileMetadata",
    "save_tlora",
    "read_tlora_metadata",
    "atomic_save_safetensors",
    "LoadedTLoRA",
    "TLoRAFormat",
    "load_tlora",
    "read_tlora",
    "detect_format",
    "register_format",
    "inspect_tlora",
    "convert_tlora",
]
