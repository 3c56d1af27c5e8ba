"""tlora_diffusers: T-LoRA (timestep-dependent LoRA rank masking) on stock diffusers pipelines."""

from .backends import LayerBackend, MaskSite, register_layer_backend
from .config import TLoRAConfig
from .io import LoadedTLoRA, TLoRAFileMetadata, convert_tlora, inspect_tlora, load_tlora, read_tlora, save_tlora
from .models import ModelAdapter, get_model_adapter, register_model_adapter, supported_models
from .patch import TLoRAPatch
from .schedule import active_rank, lora_rank_mask, rank_mask

__version__ = "0.1.0"

__all__ = [
    "TLoRAConfig",
    "TLoRAPatch",
    "load_tlora",
    "read_tlora",
    "save_tlora",
    "inspect_tlora",
    "convert_tlora",
    "LoadedTLoRA",
    "TLoRAFileMetadata",
    "active_rank",
    "rank_mask",
    "lora_rank_mask",
    "ModelAdapter",
    "register_model_adapter",
    "get_model_adapter",
    "supported_models",
    "LayerBackend",
    "MaskSite",
    "register_layer_backend",
    "__version__",
]
