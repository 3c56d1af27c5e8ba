"""Our file format: a diffusers LoRA safetensors file that also says it is a T-LoRA.

(The metadata itself, and reading it back from loaded adapters, is :mod:`tlora_diffusers.metadata`.)

Tensors use diffusers' PEFT layout (``unet.<module>.lora_A.weight`` /
``transformer.<module>.lora_B.weight``) and the LoRA config sits in diffusers' adapter
metadata, so stock ``pipe.load_lora_weights(dir)`` loads it. The T-LoRA schedule is
versioned JSON under the ``tlora_config`` metadata key, and mirrored into the PEFT
``LoraConfig.base_model_name_or_path`` (an informational field diffusers never reads)
so that ``TLoRAPatch(pipe)`` finds it after a stock load. A stock hotswap replaces an
adapter's weights without touching that field, so the metadata also carries a small
fingerprint of the weights (a few ``lora_A`` values): a config whose weights are gone is
refused instead of read.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ..metadata import (COMPONENT_PREFIXES, FILE_FORMAT_VERSION, MAX_METADATA_BYTES, READABLE_VERSIONS,
                        TLORA_METADATA_KEY, VARIANTS, WEIGHT_NAME, TLoRAFileMetadata, config_after_hotswap,
                        config_from_peft, fingerprint_matches, json_object, peft_metadata, read_safetensors_metadata,
                        read_tlora_metadata, weights_fingerprint)

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
    "weights_fingerprint",
    "fingerprint_matches",
    "config_after_hotswap",
    "json_object",
    "peft_metadata",
    "read_safetensors_metadata",
    "COMPONENT_PREFIXES",
    "LORA_ADAPTER_METADATA_KEY",
    "MAX_METADATA_BYTES",
    "READABLE_VERSIONS",
]

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it, and another thread could create a file
    with the temporary value); the round trip only where ``/proc`` is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Union[str, Path], metadata: dict[str, str]) -> Path:
    """Write a safetensors file via a temp file in the same folder and ``os.replace``.

    A crash mid-write leaves the previous file (or none), never a truncated one.
    """
    from safetensors.torch import save_file

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None  # "[Errno 2] No such file or directory: 'path'"
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a weights file is as readable as any other
        with open(tmp, "rb") as f:  # on disk before it takes the name, so a power loss cannot leave it empty
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        if path.exists() and not path.is_dir():
            raise ValueError(
                f"{path}: an existing file that is not .safetensors; pass a folder (the file is {WEIGHT_NAME} inside) "
                "or a path ending in .safetensors"
            )
        path = path / WEIGHT_NAME
    if not meta.fingerprint:
        meta = replace(meta, fingerprint=weights_fingerprint(state_dict))
    prefix = meta.component + "."
    tensors = {k if k.startswith(prefix) else prefix + k: v for k, v in state_dict.items()}
    adapter_meta = {f"{meta.component}.{k}": v for k, v in peft_metadata(lora_config, meta).items()}
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_meta, indent=2, sort_keys=True),
        TLORA_METADATA_KEY: meta.to_json(),
    }
    return atomic_save_safetensors(tensors, path, metadata)


