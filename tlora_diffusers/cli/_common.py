"""Pieces the commands share: the user-error type, argument types, model loading, config overrides."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..config import TLoRAConfig

__all__ = [
    "CLIError",
    "positive_int",
    "non_negative_int",
    "add_schedule_overrides",
    "schedule_overrides",
    "overridden_config",
    "model_dir",
    "load_pipeline",
    "load_denoiser",
    "load_lora",
    "resolve_device",
    "resolve_dtype",
    "quiet_libraries",
    "io_function",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DENOISERS = ("unet", "transformer")


class CLIError(ValueError):
    """A mistake in what the user asked for, found by the command line itself (one line, exit 2).

    A ``ValueError``, so code reusing these helpers (the Gradio app) handles it like the library's.
    """


# -- argument types (argparse turns their ArgumentTypeError into a usage error) -----------------


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


# -- T-LoRA schedule options ------------------------------------------------------------------


def add_schedule_overrides(parser: argparse.ArgumentParser, title: str, description: str) -> None:
    group = parser.add_argument_group(title, description)
    group.add_argument("--max-rank", type=int, metavar="R", help="the LoRA's rank (TLoRAConfig.max_rank)")
    group.add_argument("--min-rank", type=int, metavar="M", help="ranks active at t = T (TLoRAConfig.min_rank)")
    group.add_argument("--alpha", type=float, metavar="A", help="schedule exponent (TLoRAConfig.alpha)")


def schedule_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--max-rank/--min-rank/--alpha`` the user gave, as ``TLoRAConfig`` fields."""
    fields = {"max_rank": args.max_rank, "min_rank": args.min_rank, "alpha": args.alpha}
    return {k: v for k, v in fields.items() if v is not None}


def overridden_config(base: Optional[TLoRAConfig], overrides: dict[str, Any]) -> Optional[TLoRAConfig]:
    """``base`` with the overrides applied; without a base, ``--max-rank`` is needed (others default)."""
    if not overrides:
        return base
    if base is None and "max_rank" not in overrides:
        raise CLIError(
            "--min-rank/--alpha need --max-rank here (the file has no T-LoRA config to fill it from); "
            "pass --max-rank with the LoRA's rank"
        )
    try:
        return dataclasses.replace(base, **overrides) if base is not None else TLoRAConfig(**overrides)
    except ValueError as e:
        raise CLIError(f"invalid --max-rank/--min-rank/--alpha: {e}") from None


# -- devices, models, LoRA files --------------------------------------------------------------


def resolve_device(name: str, default: Optional[torch.device] = None) -> torch.device:
    """``auto``: ``default`` (accelerate's device for this process) or the best local one."""
    if name == "auto":
        if default is not None:
            return torch.device(default)
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a torch device; use auto, cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: torch sees no CUDA device here; use --device cpu (or auto)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU, bfloat16 on CUDA where supported, else float16."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def model_dir(path: str) -> Path:
    """A local diffusers folder (``model_index.json`` inside), or a clear error."""
    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        what = "no such folder" if not folder.exists() else "not a diffusers pipeline folder (no model_index.json)"
        raise CLIError(
            f"--model {path}: {what}; pass a local folder written by save_pretrained, e.g. "
            "`hf download stabilityai/stable-diffusion-xl-base-1.0 --local-dir DIR`"
        )
    return folder


@contextlib.contextmanager
def quiet_libraries(verbose: bool) -> Iterator[None]:
    """Hide diffusers'/transformers' info logs and loading bars (kept with ``--verbose``)."""
    if verbose:
        yield
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(saved[0])
        tlog.set_verbosity(saved[1])
        (dlog.enable_progress_bar if saved[2] else dlog.disable_progress_bar)()
        (tlog.enable_progress_bar if saved[3] else tlog.disable_progress_bar)()


def load_pipeline(path: str, device: torch.device, dtype: torch.dtype, verbose: bool = False) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a local folder, moved to ``device``."""
    folder = model_dir(path)
    with quiet_libraries(verbose):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype)
    if not any(isinstance(getattr(pipe, a, None), torch.nn.Module) for a in _DENOISERS):
        raise CLIError(f"--model {path}: {type(pipe).__name__} has no unet or transformer for a T-LoRA")
    return pipe.to(device)


def load_denoiser(path: str, verbose: bool = False) -> torch.nn.Module:
    """Only the ``unet``/``transformer`` of a local pipeline folder (what the io functions need)."""
    folder = model_dir(path)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except ValueError as e:
        raise CLIError(f"--model {path}: model_index.json is not valid JSON ({e})") from None
    name = next((a for a in _DENOISERS if isinstance(index.get(a), list) and None not in index[a]), None)
    if name is None:
        raise CLIError(f"--model {path}: model_index.json lists no unet or transformer")
    library, class_name = index[name]
    with quiet_libraries(verbose):
        cls = getattr(importlib.import_module(library), class_name)
        return cls.from_pretrained(folder, subfolder=name).eval()


def load_lora(pipe: Any, path: str, overrides: dict[str, Any]) -> tuple[Any, str]:
    """``load_tlora`` with the command line's schedule overrides; returns ``(loaded, file format)``.

    The library refuses a config that contradicts the file's (on purpose: a silent
    override is a bug in a script). Here the user asked for it, so the file is read once,
    written with the new config to a temporary file of our format, and that is loaded.
    """
    from ..io import load_tlora, read_tlora, save_tlora
    from ..io.load import _denoiser_of, _lora_rank, resolve_path

    if not overrides:
        try:
            loaded = load_tlora(pipe, path)
        except ValueError as e:
            if "cfg=TLoRAConfig(" in str(e):  # a plain LoRA: the schedule must come from the user
                raise CLIError(f"{e} (on the command line: --max-rank R --min-rank M --alpha A)") from None
            raise
        return loaded, loaded.format
    denoiser = _denoiser_of(pipe)
    try:
        converted = read_tlora(path, denoiser)
    except ValueError as first:
        if "max_rank" not in overrides:
            raise
        try:  # a file without a schedule: the overrides are the whole config
            converted = read_tlora(path, denoiser, overridden_config(None, overrides))
        except (ValueError, CLIError):
            raise first from None
    cfg = overridden_config(converted.meta.config, overrides)
    rank = _lora_rank(converted.state_dict, Path(path))
    if rank != cfg.lora_rank:
        raise CLIError(
            f"--max-rank {cfg.max_rank} does not fit {path}: its LoRA rank is {rank} "
            f"(layout {cfg.layout!r}); a T-LoRA masks the LoRA's own ranks, so leave --max-rank out"
        )
    meta = dataclasses.replace(converted.meta, config=cfg)
    with tempfile.TemporaryDirectory(prefix="tlora-override-") as tmp:
        file = save_tlora(Path(tmp) / "override.safetensors", converted.state_dict, meta, converted.lora_config)
        loaded = load_tlora(pipe, file)
    return dataclasses.replace(loaded, path=resolve_path(path)), converted.format


def io_function(name: str, command: str) -> Callable[..., Any]:
    """``tlora_diffusers.io.inspect.<name>``, or a clear error if this install lacks it."""
    try:
        module = importlib.import_module("tlora_diffusers.io.inspect")
    except ModuleNotFoundError as e:
        if e.name != "tlora_diffusers.io.inspect":
            raise
        module = None
    function = getattr(module, name, None)
    if function is None:
        raise CLIError(
            f"`tlora-diffusers {command}` needs tlora_diffusers.io.inspect.{name}, which this installation "
            "does not have; upgrade tlora_diffusers"
        )
    return function
