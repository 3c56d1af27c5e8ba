"""One loader for every T-LoRA format: detect, convert to PEFT tensors, load onto the denoiser.

Every format converts to the same form (:class:`ConvertedTLoRA`: PEFT LoRA tensors, a
``LoraConfig`` dict and the T-LoRA metadata), which diffusers' own
``load_lora_adapter`` puts on the denoiser. ``TLoRAPatch`` then masks it like any other
PEFT LoRA. New formats are added with :func:`register_format`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from ..config import TLoRAConfig
from .format import (
    LORA_ADAPTER_METADATA_KEY,
    TLORA_METADATA_KEY,
    WEIGHT_NAME,
    TLoRAFileMetadata,
    json_object,
    peft_metadata,
    read_safetensors_metadata,
)

__all__ = ["ConvertedTLoRA", "LoadedTLoRA", "TLoRAFormat", "register_format", "detect_format", "read_tlora", "load_tlora"]


@dataclass
class ConvertedTLoRA:
    """Any T-LoRA file in PEFT form: what ``load_lora_adapter`` and ``save_tlora`` take."""

    state_dict: dict[str, torch.Tensor]
    lora_config: dict[str, Any]
    meta: TLoRAFileMetadata
    format: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoadedTLoRA:
    """What :func:`load_tlora` put on the denoiser."""

    format: str
    config: TLoRAConfig
    adapter_name: str
    path: Path
    meta: TLoRAFileMetadata


@dataclass(frozen=True)
class TLoRAFormat:
    """A file format: ``detect(keys, metadata)`` is cheap; ``convert`` reads the tensors.

    ``convert(path, tensors, metadata, denoiser, cfg, **options)`` returns a
    :class:`ConvertedTLoRA`; ``denoiser`` is ``None`` when converting without a model
    (formats that need the base weights raise then).
    """

    name: str
    description: str
    detect: Callable[[list[str], dict[str, str]], bool]
    convert: Callable[..., ConvertedTLoRA]


_FORMATS: list[TLoRAFormat] = []


def register_format(fmt: TLoRAFormat, *, first: bool = False) -> None:
    """Teach :func:`load_tlora` a new format (checked in registration order, or first)."""
    if any(f.name == fmt.name for f in _FORMATS):
        raise ValueError(f"a T-LoRA format named {fmt.name!r} is already registered")
    _FORMATS.insert(0, fmt) if first else _FORMATS.append(fmt)


def formats() -> list[TLoRAFormat]:
    return list(_FORMATS)


def resolve_path(path: Union[str, Path]) -> Path:
    """A file, or the weights file inside a folder (ours / diffusers' name first)."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHT_NAME, "lora.pt", "pytorch_lora_weights.bin"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no {WEIGHT_NAME} or lora.pt in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file or a weights-only torch pickle."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        metadata = read_safetensors_metadata(path)
        try:
            return load_file(str(path)), metadata
        except Exception as e:
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: cannot be read as a weights-only torch file ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Pickles are never executed here; convert it to safetensors in a trusted environment first"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj), {}


def detect_format(keys: list[str], metadata: dict[str, str], path: Union[str, Path] = "file") -> TLoRAFormat:
    for fmt in _FORMATS:
        if fmt.detect(keys, metadata):
            return fmt
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise ValueError(
        f"{path}: unknown T-LoRA key layout (e.g. {sample}); supported formats: "
        + "; ".join(f"{f.name} ({f.description})" for f in _FORMATS)
    )


def read_tlora(
    path: Union[str, Path], denoiser: Optional[nn.Module] = None, cfg: Optional[TLoRAConfig] = None, **options: Any
) -> ConvertedTLoRA:
    """Read any supported T-LoRA file into PEFT form (without loading it anywhere)."""
    path = resolve_path(path)
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


def _denoiser_of(target: Any) -> nn.Module:
    if isinstance(target, nn.Module):
        return getattr(target, "_orig_mod", target)
    for attr in ("unet", "transformer"):
        if isinstance(getattr(target, attr, None), nn.Module):
            return getattr(target, attr)
    raise TypeError(f"load_tlora needs a diffusers pipeline or a denoiser module, got {type(target).__name__}")


def check_modules(denoiser: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Every LoRA tensor must target an existing Linear/Conv layer of matching width."""
    names = dict(denoiser.named_modules())
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


def load_tlora(
    target: Any,
    path: Union[str, Path],
    cfg: Optional[TLoRAConfig] = None,
    *,
    adapter_name: Optional[str] = None,
    **options: Any,
) -> LoadedTLoRA:
    """Load any supported T-LoRA file onto a pipeline's denoiser (or a bare denoiser) as a PEFT LoRA.

    The config comes from ``cfg``, else from the file. Nothing is changed when loading
    fails. Then ``TLoRAPatch(pipe)`` masks it with the loaded config.

    Example:
        >>> info = load_tlora(pipe, "out/pytorch_lora_weights.safetensors")
        >>> with TLoRAPatch(pipe):
        ...     image = pipe("a sks dog").images[0]
    """
    denoiser = _denoiser_of(target)
    path = resolve_path(path)
    converted = read_tlora(path, denoiser, cfg, **options)
    check_modules(denoiser, converted.state_dict, path)
    name = _free_adapter_name(denoiser, adapter_name)
    param = next(denoiser.parameters())
    state_dict = {k: v.to(param.device) for k, v in converted.state_dict.items()}
    try:
        denoiser.load_lora_adapter(
            state_dict, prefix=None, adapter_name=name, metadata=peft_metadata(converted.lora_config, converted.meta)
        )
    except BaseException:
        if name in (getattr(denoiser, "peft_config", {}) or {}):
            denoiser.delete_adapters(name)
        raise
    return LoadedTLoRA(converted.format, converted.meta.config, name, path, converted.meta)


# -- our format and plain diffusers LoRA files ---------------------------------------------------


def _split_component(tensors: dict[str, torch.Tensor], path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    components = {k.split(".", 1)[0] for k in tensors}
    if not components <= {"unet", "transformer"} or len(components) != 1:
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


def default_lora_config(state_dict: dict[str, torch.Tensor], rank: int, lora_alpha: Optional[float] = None) -> dict[str, Any]:
    """A ``LoraConfig`` dict targeting exactly the modules of ``state_dict`` (scaling ``lora_alpha / r``)."""
    targets = sorted({k.rpartition(".lora_")[0] for k in state_dict})
    return {"r": rank, "lora_alpha": rank if lora_alpha is None else lora_alpha, "target_modules": targets}


def _lora_rank(state_dict: dict[str, torch.Tensor], path: Path) -> int:
    ranks = {v.shape[0] for k, v in state_dict.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"{path}: LoRA layers have different ranks {sorted(ranks)}; a T-LoRA has one rank")
    return ranks.pop()


def _convert_diffusers(path, tensors, metadata, denoiser, cfg, **options) -> ConvertedTLoRA:
    component, state_dict = _split_component(tensors, path)
    rank = _lora_rank(state_dict, path)
    lora_config = _adapter_config(metadata, component, path) or default_lora_config(state_dict, rank)
    lora_config.pop("base_model_name_or_path", None)
    if TLORA_METADATA_KEY in metadata:
        meta = TLoRAFileMetadata.from_json(metadata[TLORA_METADATA_KEY], where=str(path))
        fmt = "tlora_diffusers"
    elif cfg is not None:
        meta = TLoRAFileMetadata(cfg, component=component, source_format="diffusers")
        fmt = "diffusers"
    else:
        raise ValueError(
            f"{path}: a plain LoRA file with no T-LoRA config in its metadata; pass cfg=TLoRAConfig(max_rank={rank}, "
            "min_rank=..., alpha=...) with the schedule it was trained with"
        )
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
    return bool(keys) and all(k.startswith(("unet.", "transformer.")) and ".lora_" in k for k in keys)


register_format(
    TLoRAFormat(
        "tlora_diffusers",
        "diffusers/PEFT LoRA safetensors: unet.<module>.lora_A.weight, with or without tlora_config metadata",
        _is_diffusers,
        _convert_diffusers,
    )
)
from . import lycoris, paper  # noqa: E402,F401
