"""One loader for every T-LoRA format: find the file, detect its format, convert, load onto the denoiser.

Every format converts to the same form (:class:`~tlora_diffusers.io.formats.ConvertedTLoRA`),
which diffusers' own ``load_lora_adapter`` puts on the denoiser; ``TLoRAPatch`` then masks it
like any other PEFT LoRA. New formats are added with :func:`~tlora_diffusers.io.formats.register_format`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..config import TLoRAConfig
from .format import (COMPONENT_PREFIXES, TLORA_METADATA_KEY, WEIGHT_NAME, TLoRAFileMetadata, peft_metadata,
                     read_safetensors_metadata)
from ._offload import offloading_disabled
from .formats import ConvertedTLoRA, detect_format

__all__ = ["LoadedTLoRA", "read_tlora", "load_tlora", "load_converted", "resolve_path", "read_tensors", "denoiser_of",
           "check_modules", "same_schedule", "read_schedule"]


@dataclass(frozen=True)
class LoadedTLoRA:
    """What :func:`load_tlora` put on the denoiser."""

    format: str
    config: TLoRAConfig
    adapter_name: str
    path: Path
    meta: TLoRAFileMetadata


def resolve_path(path: Union[str, Path]) -> Path:
    """A file, or the weights file inside a folder (ours / diffusers' name first)."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHT_NAME, "lora.pt", "pytorch_lora_weights.bin"):
            if (path / name).is_file():
                return path / name
        if _is_training_checkpoint(path):
            raise ValueError(f"{path}: a training checkpoint without T-LoRA weights (written before tlora_diffusers "
                             "0.3); continue it with `tlora-diffusers train --resume`, or load the finished run's "
                             f"folder ({path.parent})")
        raise FileNotFoundError(f"{path}: no {WEIGHT_NAME} or lora.pt in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.name in _CHECKPOINT_FILES and _is_training_checkpoint(path.parent):
        raise ValueError(f"{path}: training state of a tlora_diffusers checkpoint (for --resume), not a T-LoRA; "
                         f"the checkpoint's T-LoRA is {path.parent / WEIGHT_NAME}: pass the folder {path.parent}")
    return path


#: What :func:`tlora_diffusers.training.checkpoint.save_checkpoint` writes besides the T-LoRA.
_CHECKPOINT_FILES = ("params.safetensors", "optimizer.safetensors", "rng.safetensors", "grads.safetensors")


def _is_training_checkpoint(folder: Path) -> bool:
    return (folder / "state.json").is_file() and (folder / "params.safetensors").is_file()


_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"BM", "a BMP image"), (b"%PDF", "a PDF"))


def _what_is(path: Path) -> Optional[str]:
    """What a file that is not a T-LoRA file looks like, from its first bytes (``None``: maybe a torch file)."""
    with open(path, "rb") as f:
        head = f.read(16)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return None  # a zip (torch.save) or a pickle
    return "neither a safetensors file nor a torch weights file"


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file or a weights-only torch pickle."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        metadata = read_safetensors_metadata(path)
        try:
            return load_file(str(path)), metadata
        except Exception as e:
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    kind = _what_is(path)
    if kind is not None:
        raise ValueError(
            f"{path}: not a T-LoRA file ({kind}); pass a .safetensors LoRA file, a torch weights file such as the "
            "paper's lora.pt, or a folder holding one"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: cannot be read as a weights-only torch file ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Only plain tensors are read here (pickled code is never run): save the weights with safetensors, "
            "or as a dict of tensors"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj), {}


def read_tlora(
    path: Union[str, Path], denoiser: Optional[nn.Module] = None, cfg: Optional[TLoRAConfig] = None, **options: Any
) -> ConvertedTLoRA:
    """Read any supported T-LoRA file into PEFT form (without loading it anywhere)."""
    path = resolve_path(_from_hub(path, options))
    tensors, metadata = read_tensors(path)
    fmt = detect_format(list(tensors), metadata, path)
    converted = fmt.convert(path, tensors, metadata, denoiser, cfg, **options)
    if cfg is not None and not same_schedule(converted.meta.config, cfg):
        raise ValueError(
            f"{path}: the file's T-LoRA config {converted.meta.config} contradicts cfg={cfg}; "
            "drop cfg to use the file's, or convert the file with the config you want"
        )
    return converted


def same_schedule(a: TLoRAConfig, b: TLoRAConfig) -> bool:
    """Equal schedules; ``layout`` is how a file encodes the ranks, not part of the schedule."""
    return (a.max_rank, a.min_rank, a.alpha) == (b.max_rank, b.min_rank, b.alpha)


def denoiser_of(target: Any, component: Optional[str] = None) -> nn.Module:
    """The denoiser a file goes into: ``target`` itself, or ``pipe.<component>`` (default: its first denoiser)."""
    if isinstance(target, nn.Module):
        return getattr(target, "_orig_mod", target)
    from ..models import pipeline_denoisers

    denoisers = pipeline_denoisers(target) if hasattr(target, "components") else {}
    if not denoisers:
        raise TypeError(f"load_tlora needs a diffusers pipeline or a denoiser module, got {type(target).__name__}")
    if component is None:
        return next(iter(denoisers.values()))
    if component not in denoisers:
        raise ValueError(
            f"{type(target).__name__} has no denoiser component {component!r}; its denoisers: {sorted(denoisers)}"
        )
    return denoisers[component]


def check_modules(denoiser: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Every LoRA tensor must target an existing Linear/Conv layer of matching width."""
    names = dict(denoiser.named_modules())
    other = sorted(k for k in state_dict if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if other:  # diffusers would drop them with a log line: the adapter would not be the file's
        raise ValueError(
            f"{path}: {len(other)} tensor(s) that are not LoRA A/B weights, e.g. {', '.join(other[:3])}; a T-LoRA "
            "masks the ranks of lora_A, so DoRA magnitudes, LoRA biases and other extras are not supported"
        )
    missing, wrong = [], []
    for key, tensor in state_dict.items():
        module_path, _, param = key.rpartition(".lora_")
        module = names.get(module_path)
        module = getattr(module, "base_layer", module)
        if module is None:
            missing.append(module_path)
        elif param.startswith("A") and getattr(module, "in_features", getattr(module, "in_channels", None)) != tensor.shape[1]:
            wrong.append(f"{module_path} (input width {tensor.shape[1]} in the file)")
        elif param.startswith("B") and getattr(module, "out_features", getattr(module, "out_channels", None)) != tensor.shape[0]:
            wrong.append(f"{module_path} (output width {tensor.shape[0]} in the file)")
    if missing:
        missing = sorted(set(missing))
        raise ValueError(
            f"{path}: {len(missing)} module(s) do not exist in {type(denoiser).__name__} (a file for another "
            f"base model?), e.g. {', '.join(missing[:3])}"
        )
    if wrong:
        raise ValueError(f"{path}: tensor shapes do not fit {type(denoiser).__name__}: {', '.join(wrong[:3])}")


def _free_adapter_name(denoiser: nn.Module, wanted: Optional[str]) -> str:
    taken = set(getattr(denoiser, "peft_config", {}) or {})
    if wanted is not None:
        if wanted in taken:
            raise ValueError(f"adapter name {wanted!r} is already loaded; pass another adapter_name or delete it first")
        return wanted
    name, i = "tlora", 1
    while name in taken:
        name, i = f"tlora_{i}", i + 1
    return name


def _from_hub(path: Union[str, Path], options: dict[str, Any]) -> Union[str, Path]:
    """A Hub repo id (``"user/repo"`` with ``weight_name=``): the cached or downloaded file, as diffusers resolves it."""
    hub = {k: options.pop(k) for k in ("weight_name", "subfolder", "revision", "cache_dir", "token",
                                       "local_files_only") if k in options}
    text = str(path)
    if Path(text).exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        if "weight_name" in hub and Path(text).is_dir():
            return Path(text) / hub.pop("weight_name")
        if hub:
            raise ValueError(f"{', '.join(sorted(hub))} apply to Hub repo ids ('user/repo'); {text} is a local path")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    filename = hub.pop("weight_name", WEIGHT_NAME)
    try:
        return Path(hf_hub_download(text, filename=filename, **hub))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{text}: not a local file or folder, and {filename!r} of Hub repo {text!r} is not in the local cache "
            "(HF_HUB_OFFLINE is set, or the Hub cannot be reached); download it first, e.g. "
            f"`hf download {text} {filename}`"
        ) from None


def load_tlora(
    target: Any,
    path: Union[str, Path],
    cfg: Optional[TLoRAConfig] = None,
    *,
    adapter_name: Optional[str] = None,
    component: Optional[str] = None,
    **options: Any,
) -> LoadedTLoRA:
    """Load any supported T-LoRA file onto a pipeline's denoiser (or a bare denoiser) as a PEFT LoRA.

    ``path`` is a file, a folder holding one, or a Hub repo id with ``weight_name=`` (as
    ``load_lora_weights`` takes them). The schedule comes from ``cfg``, else from the file;
    how the file encodes its ranks (``layout``) is the file's business. ``component``
    picks the pipeline's denoiser (``"transformer_2"``, ``"controlnet"``; default: the
    file's). Offloaded pipelines (model, sequential, group offloading) are handled as
    ``load_lora_weights`` does. Nothing is changed when loading fails. Then
    ``TLoRAPatch(pipe)`` masks it with the loaded config.

    Example:
        >>> info = load_tlora(pipe, "out/pytorch_lora_weights.safetensors")
        >>> with TLoRAPatch(pipe):
        ...     image = pipe("a sks dog").images[0]
    """
    path = resolve_path(_from_hub(path, options))
    pipe = None if isinstance(target, nn.Module) else target
    with offloading_disabled(pipe):
        tensors, metadata = read_tensors(path)
        fmt = detect_format(list(tensors), metadata, path)
        if component is None and pipe is not None and _file_component(tensors) in vars(pipe):
            component = _file_component(tensors)
        denoiser = denoiser_of(target, component)
        converted = fmt.convert(path, tensors, metadata, denoiser, cfg, **options)
        if cfg is not None and not same_schedule(converted.meta.config, cfg):
            raise ValueError(
                f"{path}: the file's T-LoRA config {converted.meta.config} contradicts cfg={cfg}; "
                "drop cfg to use the file's, or convert the file with the config you want"
            )
        return _load(denoiser, converted, path, adapter_name)


def load_converted(target: Any, converted: ConvertedTLoRA, path: Union[str, Path], *,
                   adapter_name: Optional[str] = None, component: Optional[str] = None) -> LoadedTLoRA:
    """Put an already converted T-LoRA (from :func:`read_tlora`) on a pipeline's denoiser or a denoiser."""
    pipe = None if isinstance(target, nn.Module) else target
    if component is None and pipe is not None and converted.meta.component in vars(pipe):
        component = converted.meta.component
    with offloading_disabled(pipe):
        return _load(denoiser_of(target, component), converted, Path(path), adapter_name)


def _load(denoiser: nn.Module, converted: ConvertedTLoRA, path: Path, adapter_name: Optional[str]) -> LoadedTLoRA:
    check_modules(denoiser, converted.state_dict, path)
    name = _free_adapter_name(denoiser, adapter_name)
    try:
        denoiser.load_lora_adapter(dict(converted.state_dict), prefix=None, adapter_name=name,
                                   metadata=peft_metadata(converted.lora_config, converted.meta))
    except BaseException:
        if name in (getattr(denoiser, "peft_config", {}) or {}):
            denoiser.delete_adapters(name)
        raise
    return LoadedTLoRA(converted.format, converted.meta.config, name, path, converted.meta)


def _file_component(tensors: dict[str, torch.Tensor]) -> Optional[str]:
    head = next(iter(tensors), "").split(".", 1)[0]
    return head if head in COMPONENT_PREFIXES else None


def read_schedule(path: Union[str, Path]) -> Optional[TLoRAConfig]:
    """The T-LoRA schedule a safetensors file's metadata declares (ours, the sd-scripts fork's ``ss_tlora_*``,
    Fizgig's ``ss_adapter``), or ``None`` for a file that declares none.

    For the stock path: ``pipe.load_lora_weights(path); TLoRAPatch(pipe, read_schedule(path))``.
    """
    from safetensors import safe_open

    path = Path(path)
    path = resolve_path(path)
    metadata = read_safetensors_metadata(path)
    if TLORA_METADATA_KEY in metadata:
        return TLoRAFileMetadata.from_json(metadata[TLORA_METADATA_KEY], where=str(path)).config
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        rank = None
        for key in keys:
            if key.endswith(("lora_down.weight", "lora_A.weight", "q_layer.weight")):
                rank = f.get_slice(key).get_shape()[0]
                break
    if rank is None:
        return None
    from .kohya import kohya_schedule

    return kohya_schedule(metadata, rank, path)[0]
