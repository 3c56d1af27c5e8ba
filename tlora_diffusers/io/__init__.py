"""T-LoRA files: our self-describing format, and loaders for the formats in the wild."""

from .format import (
    TLORA_METADATA_KEY,
    WEIGHT_NAME,
    TLoRAFileMetadata,
    atomic_save_safetensors,
    read_tlora_metadata,
    save_tlora,
)
from .formats import ConvertedTLoRA, TLoRAFormat, detect_format, formats, register_format
from .inspect import TLoRAReport, convert_tlora, inspect_tlora
from .export import EXPORT_FORMATS, node_settings
from .load import LoadedTLoRA, load_tlora, read_schedule, read_tlora

__all__ = [
    "TLORA_METADATA_KEY",
    "WEIGHT_NAME",
    "TLoRAFileMetadata",
    "save_tlora",
    "read_tlora_metadata",
    "atomic_save_safetensors",
    "ConvertedTLoRA",
    "LoadedTLoRA",
    "TLoRAFormat",
    "TLoRAReport",
    "load_tlora",
    "read_tlora",
    "detect_format",
    "formats",
    "register_format",
    "inspect_tlora",
    "convert_tlora",
    "read_schedule",
    "EXPORT_FORMATS",
    "node_settings",
]
