"""Our file format: a diffusers LoRA safetensors file that also says it is a T-LoRA.

Tensors use diffusers' PEFT layout (``unet.<module>.lora_A.weight`` /
``transformer.<module>.lora_B.weight``) and the LoRA config sits in diffusers' adapter
metadata, so stock ``pipe.load_lora_weights(dir)`` loads it. The T-LoRA schedule is
versioned JSON under the ``tlora_config`` metadata key, and mirrored into the PEFT
``LoraConfig.base_model_name_or_path`` (an informational field diffusers never reads)
so that ``TLoRAPatch(pipe)`` finds it after a stock load.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..config import TLoRAConfig

__all__ = [
    "TLORA_METADATA_KEY",
    "WEIGHT_NAME",
    "FILE_FORMAT_VERSION",
    "VARIANTS",
    "TLoRAFileMetadata",
    "save_tlora",
    "read_tlora_metadata",
    "atomic_save_safetensors",
    "config_from_peft",
]

TLORA_METADATA_KEY = "tlora_config"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FILE_FORMAT_VERSION = 1
VARIANTS = ("vanilla", "ortho")
_PEFT_MARKER = "tlora_diffusers:"
#: Metadata larger than this is refused before parsing (safetensors headers are small).
MAX_METADATA_BYTES = 1 << 20


def json_object(text: Any, where: str, what: str) -> dict[str, Any]:
    """Parse ``text`` as a JSON object; errors name the file (``where``) and the entry (``what``)."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {what} must be a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class TLoRAFileMetadata:
    """What a T-LoRA file says about itself (the ``tlora_config`` metadata entry)."""

    config: TLoRAConfig
    variant: str = "vanilla"
    base_model: Optional[str] = None
    component: str = "unet"
    target_modules: tuple[str, ...] = field(default_factory=tuple)
    source_format: Optional[str] = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.component not in ("unet", "transformer"):
            raise ValueError(f"component must be 'unet' or 'transformer', got {self.component!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": FILE_FORMAT_VERSION,
                **{k: v for k, v in self.config.to_dict().items() if k != "format_version"},
                "variant": self.variant,
                "base_model": self.base_model,
                "component": self.component,
                "target_modules": list(self.target_modules),
                "source_format": self.source_format,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, where: str = "metadata") -> "TLoRAFileMetadata":
        data = json_object(text, where, f"'{TLORA_METADATA_KEY}'")
        version = data.pop("format_version", None)
        if version != FILE_FORMAT_VERSION:
            raise ValueError(
                f"{where}: T-LoRA file format_version must be {FILE_FORMAT_VERSION}, got {version!r}; "
                "upgrade tlora_diffusers to read it"
            )
        try:
            config = TLoRAConfig.from_dict({k: data.pop(k) for k in ("max_rank", "min_rank", "alpha", "layout") if k in data})
            targets = data.pop("target_modules", [])
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise ValueError(f"target_modules must be a list of strings, got {targets!r}")
            for key in ("base_model", "source_format"):
                if data.get(key) is not None and not isinstance(data[key], str):
                    raise ValueError(f"{key} must be a string, got {data[key]!r}")
            return cls(config=config, target_modules=tuple(targets), **data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: invalid '{TLORA_METADATA_KEY}': {e}") from None


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Union[str, Path], metadata: dict[str, str]) -> Path:
    """Write a safetensors file via a temp file in the same folder and ``os.replace``.

    A crash mid-write leaves the previous file (or none), never a truncated one.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def peft_metadata(lora_config: Mapping[str, Any], meta: TLoRAFileMetadata) -> dict[str, Any]:
    """A JSON-ready ``LoraConfig`` dict carrying the T-LoRA config in ``base_model_name_or_path``."""
    out = {}
    for key, value in dict(lora_config).items():
        out[key] = sorted(value) if isinstance(value, (set, frozenset)) else value
    out["base_model_name_or_path"] = _PEFT_MARKER + meta.to_json()
    return out


def save_tlora(
    path: Union[str, Path],
    state_dict: Mapping[str, torch.Tensor],
    meta: TLoRAFileMetadata,
    lora_config: Mapping[str, Any],
) -> Path:
    """Save a T-LoRA that stock ``pipe.load_lora_weights`` loads.

    Args:
        path: a folder (the file is ``pytorch_lora_weights.safetensors`` inside) or a
            ``.safetensors`` file path.
        state_dict: PEFT LoRA tensors keyed by module path, without the component prefix
            (what ``peft.get_peft_model_state_dict(denoiser)`` returns).
        meta: the T-LoRA config and provenance.
        lora_config: ``LoraConfig.to_dict()`` of the adapter (r, lora_alpha, target_modules, ...).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / WEIGHT_NAME
    prefix = meta.component + "."
    tensors = {k if k.startswith(prefix) else prefix + k: v for k, v in state_dict.items()}
    adapter_meta = {f"{meta.component}.{k}": v for k, v in peft_metadata(lora_config, meta).items()}
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_meta, indent=2, sort_keys=True),
        TLORA_METADATA_KEY: meta.to_json(),
    }
    return atomic_save_safetensors(tensors, path, metadata)


def read_safetensors_metadata(path: Union[str, Path]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, with clear errors for files that are not one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    total = sum(len(k) + len(v) for k, v in metadata.items())
    if total > MAX_METADATA_BYTES:
        raise ValueError(f"{path}: metadata is {total} bytes, more than the {MAX_METADATA_BYTES} allowed")
    return metadata


def read_tlora_metadata(path: Union[str, Path]) -> Optional[TLoRAFileMetadata]:
    """The T-LoRA metadata of one of our files, ``None`` for a plain LoRA file."""
    metadata = read_safetensors_metadata(path)
    if TLORA_METADATA_KEY not in metadata:
        return None
    return TLoRAFileMetadata.from_json(metadata[TLORA_METADATA_KEY], where=str(path))


def config_from_peft(peft_config: Any) -> Optional[TLoRAFileMetadata]:
    """The T-LoRA metadata mirrored into a loaded adapter's ``LoraConfig``, if any."""
    marker = getattr(peft_config, "base_model_name_or_path", None)
    if not isinstance(marker, str) or not marker.startswith(_PEFT_MARKER):
        return None
    return TLoRAFileMetadata.from_json(marker[len(_PEFT_MARKER):], where="adapter config")
