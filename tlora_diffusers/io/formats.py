"""The registry of T-LoRA file formats: every format converts to one PEFT form.

A :class:`TLoRAFormat` detects its files from their keys and metadata (cheap) and
converts them to a :class:`ConvertedTLoRA` (PEFT LoRA tensors, a ``LoraConfig`` dict and
the T-LoRA metadata), which diffusers' ``load_lora_adapter`` puts on a denoiser. The
built-in formats live in their own modules (``diffusers_format``, ``lycoris``,
``paper``), each exposing ``FORMAT``; they are registered on first use, so no format
module imports another.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch

from .format import TLoRAFileMetadata

__all__ = ["ConvertedTLoRA", "TLoRAFormat", "register_format", "formats", "detect_format", "BUILTIN_FORMATS"]

#: Modules of the built-in formats, in detection order.
BUILTIN_FORMATS = ("diffusers_format", "lycoris", "paper", "kohya")


@dataclass
class ConvertedTLoRA:
    """Any T-LoRA file in PEFT form: what ``load_lora_adapter`` and ``save_tlora`` take."""

    state_dict: dict[str, torch.Tensor]
    lora_config: dict[str, Any]
    meta: TLoRAFileMetadata
    format: str
    notes: list[str] = field(default_factory=list)


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
_GUARD = threading.Lock()
_LOADED = False


def _load_builtins() -> None:
    global _LOADED
    with _GUARD:
        if _LOADED:
            return
        _LOADED = True
        builtins = [importlib.import_module(f"{__package__}.{m}").FORMAT for m in BUILTIN_FORMATS]
        _FORMATS[:0] = builtins


def register_format(fmt: TLoRAFormat, *, first: bool = False, replace: bool = False) -> None:
    """Teach :func:`~tlora_diffusers.load_tlora` a new format (checked after the built-ins, or ``first``).

    A name already registered needs ``replace=True``.
    """
    if not isinstance(fmt, TLoRAFormat):
        raise TypeError(f"register_format takes a TLoRAFormat, got {type(fmt).__name__}")
    _load_builtins()
    with _GUARD:
        same = [i for i, f in enumerate(_FORMATS) if f.name == fmt.name]
        if same and not replace:
            raise ValueError(f"a T-LoRA format named {fmt.name!r} is already registered; pass replace=True")
        for i in reversed(same):
            del _FORMATS[i]
        _FORMATS.insert(0, fmt) if first else _FORMATS.append(fmt)


def formats() -> list[TLoRAFormat]:
    _load_builtins()
    return list(_FORMATS)


def detect_format(keys: list[str], metadata: dict[str, str], path: Union[str, Path] = "file") -> TLoRAFormat:
    """The first registered format that recognises these keys, or an error listing every format."""
    known = formats()
    for fmt in known:
        if fmt.detect(keys, metadata):
            return fmt
    sample = ", ".join(sorted(keys)[:2]) or "no tensors"
    raise ValueError(
        f"{path}: unknown T-LoRA key layout (e.g. {sample}); known formats: {', '.join(f.name for f in known)} "
        "(the README's table shows their keys; tlora_diffusers.io.register_format teaches a new one)"
    )
