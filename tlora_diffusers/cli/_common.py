"""Pieces the commands share: the user-error type, argument types, quiet libraries, models and LoRA files.

Messages here speak the command line's vocabulary (``--model``, ``--min-rank``), not the
library's (``denoiser=``, ``cfg=``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch


__all__ = [
    "CLIError",
    "positive_int",
    "non_negative_int",
    "add_schedule_overrides",
    "schedule_overrides",
    "model_dir",
    "load_pipeline",
    "load_denoiser",
    "read_lora",
    "load_lora",
    "resolve_device",
    "resolve_dtype",
    "quiet_libraries",
    "add_threads",
    "use_threads",
    "scenes_alias",
    "lora_source",
    "local_lora",
    "writable_dir",
    "DTYPES",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODEL_INDEX = "model_index.json"


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


# -- CPU threads ------------------------------------------------------------------------------


def _threads(text: str) -> str:
    from ..threads import choose_threads

    try:
        choose_threads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_threads, default="auto", metavar="N",
                        help="torch CPU threads: a number, or auto = the CPUs this process may use minus those "
                             "other processes keep busy (also TLORA_THREADS)")


def use_threads(args: argparse.Namespace) -> int:
    """Set torch's CPU threads from ``--threads`` (see :mod:`tlora_diffusers.threads`)."""
    from ..threads import apply_threads

    return apply_threads(None if getattr(args, "threads", "auto") == "auto" else args.threads)


# -- quiet by default -----------------------------------------------------------------------------

#: Third-party messages that say nothing to a user of this command line (shown with --verbose).
_NOISE = (
    r".*requires torchvision",  # transformers' image processors, on import
    r".*No LoRA keys associated to",  # diffusers, when a LoRA file has no text-encoder part
    r".*should be kept in float32",  # diffusers, on a dtype cast
    r".*upcast_vae",  # diffusers' own internal deprecation inside its pipelines
    r".*register_constant\(\) on Enum",  # torch, when torchao registers its enums
    r".*dtype=torch.float16. cannot run with .cpu.",  # diffusers; the command line says it once, itself
)
#: Loggers of optional packages that print on import (torchao's kernel libraries, torch's pytree notes).
_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "torch._inductor")


class _Once(logging.Filter):
    """Let each distinct message through once (diffusers repeats per component)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextlib.contextmanager
def quiet_libraries(verbose: bool) -> Iterator[None]:
    """Hide diffusers'/transformers' info logs, loading bars and known noise; warnings appear once.

    ``--verbose`` keeps everything.
    """
    if verbose:
        yield
        return
    from transformers.utils import logging as tlog

    saved_t = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()  # before diffusers imports transformers' image processors
    tlog.disable_progress_bar()
    from diffusers.utils import logging as dlog

    saved_d = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    once = _Once()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "accelerate", "peft")]
    for logger in loggers:
        logger.addFilter(once)
    quiet = [logging.getLogger(name) for name in _IMPORT_LOGGERS]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # about libraries' internals, not for a user
        warnings.simplefilter("once", UserWarning)  # a message repeated from many places: shown once
        warnings.simplefilter("once", FutureWarning)
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(once)
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
            dlog.set_verbosity(saved_d[0])
            tlog.set_verbosity(saved_t[0])
            (dlog.enable_progress_bar if saved_d[1] else dlog.disable_progress_bar)()
            (tlog.enable_progress_bar if saved_t[1] else tlog.disable_progress_bar)()


# -- T-LoRA schedule options ------------------------------------------------------------------


def add_schedule_overrides(parser: argparse.ArgumentParser, title: str, description: str) -> None:
    group = parser.add_argument_group(title, description)
    group.add_argument("--max-rank", type=positive_int, metavar="R",
                       help="the LoRA's rank, TLoRAConfig.max_rank (default: the file's)")
    group.add_argument("--min-rank", type=non_negative_int, metavar="M",
                       help="ranks active at t = T, TLoRAConfig.min_rank (default: the file's, else 1)")
    group.add_argument("--alpha", type=float, metavar="A",
                       help="schedule exponent, TLoRAConfig.alpha (default: the file's, else 1.0)")
    group.add_argument("--lycoris-config", metavar="FILE",
                       help="SimpleTuner's lycoris_config.json, for a LyCORIS file without its header (default: none)")


def schedule_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--max-rank/--min-rank/--alpha`` the user gave, as ``TLoRAConfig`` fields."""
    fields = {"max_rank": args.max_rank, "min_rank": args.min_rank, "alpha": args.alpha}
    return {k: v for k, v in fields.items() if v is not None}


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
        dtype = DTYPES[name]
        if dtype == torch.float16 and device.type == "cpu":
            warnings.warn("--dtype float16 on the CPU: many kernels are slow or missing there; float32 or bfloat16 "
                          "run better", UserWarning, stacklevel=2)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


#: ``--model scenes``: the shipped scenes model; ``--lora scenes-example``: the T-LoRA shipped with it.
SCENES, SCENES_EXAMPLE = "scenes", "scenes-example"


def scenes_alias(path: str) -> str:
    """``scenes`` stands for the shipped scenes model's pipeline folder."""
    if path == SCENES:
        from ..scenes import PIPELINE

        return str(PIPELINE)
    return path


def model_dir(path: str, flag: str = "--model") -> Path:
    """A local diffusers folder (``model_index.json`` inside, or that file itself), or a clear error."""
    path = scenes_alias(path)
    folder = Path(path)
    if folder.is_file() and folder.name == MODEL_INDEX:
        folder = folder.parent
    if not (folder / MODEL_INDEX).is_file():
        if folder.is_dir():  # one level off? (the scenes weights folder holds its pipeline in pipeline/)
            inside = sorted(p.parent for p in list(folder.glob(f"*/{MODEL_INDEX}")) + list(folder.glob(f"*/*/{MODEL_INDEX}")))
            if inside:
                raise CLIError(f"{flag} {path}: not a diffusers pipeline folder (no {MODEL_INDEX} in it); did you "
                               f"mean {inside[0]}?")
        what = ("no such folder" if not folder.exists() else
                "a file, not a pipeline folder" if folder.is_file() else
                f"not a diffusers pipeline folder (no {MODEL_INDEX} in it)")
        raise CLIError(
            f"{flag} {path}: {what}; pass a local folder written by save_pretrained (`{SCENES}` is the shipped "
            "scenes model), e.g. `hf download stabilityai/stable-diffusion-xl-base-1.0 --local-dir DIR`"
        )
    return folder


def lora_source(text: str, flag: str = "--lora") -> str:
    """A LoRA argument: a local file or folder (checked now), ``scenes-example``, or an explicit Hub file
    ``hf://user/repo[/file.safetensors]`` (never a guess: ``a/b`` that does not exist is a missing file)."""
    if text == SCENES_EXAMPLE:
        from ..scenes import EXAMPLE_TLORA

        return str(EXAMPLE_TLORA)
    if text.startswith("hf://"):
        parts = text[len("hf://"):].strip("/").split("/")
        if len(parts) < 2 or not all(parts[:2]):
            raise CLIError(f"{flag} {text}: a Hub file is written hf://user/repo or hf://user/repo/file.safetensors")
        return text
    if not Path(text).exists():
        raise CLIError(f"{flag} {text}: no such file or folder (a Hub repo is written hf://user/repo"
                       f"[/file.safetensors]; `{SCENES_EXAMPLE}` is the T-LoRA shipped with the scenes model)")
    return text


def writable_dir(path: str, flag: str = "--out") -> Path:
    """An output folder that exists or can be made, checked before any long work."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{flag} {out}: a file is in the way; pass a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"{flag} {out}: cannot create this folder ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise CLIError(f"{flag} {out}: not writable")
    return out


def load_pipeline(path: str, device: torch.device, dtype: torch.dtype, verbose: bool = False) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a local folder, moved to ``device``."""
    from ..models import pipeline_denoisers

    folder = model_dir(path)
    with quiet_libraries(verbose):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype)
    if not pipeline_denoisers(pipe):
        raise CLIError(f"--model {path}: {type(pipe).__name__} has no denoiser of a supported model family")
    return pipe.to(device)


def load_denoiser(path: str, verbose: bool = False, component: Optional[str] = None) -> torch.nn.Module:
    """Only a denoiser of a local pipeline folder (what inspect and convert need), by its model family."""
    from ..models import supported_models

    folder = model_dir(path)
    try:
        index = json.loads((folder / MODEL_INDEX).read_text())
    except ValueError as e:
        raise CLIError(f"--model {path}: {MODEL_INDEX} is not valid JSON ({e})") from None
    known = set(supported_models())

    def denoiser_class(library: str, class_name: str) -> bool:
        if class_name in known:
            return True
        try:  # a class no family names: a denoiser if its forward takes a timestep
            from ..models.generic import timestep_parameter

            cls = getattr(importlib.import_module(library), class_name)
            return isinstance(cls, type) and issubclass(cls, torch.nn.Module) and timestep_parameter(cls) is not None
        except Exception:
            return False

    found = [name for name, value in index.items()
             if isinstance(value, list) and len(value) == 2 and value[0] and denoiser_class(*value)]
    if component is not None:
        found = [name for name in found if name == component]
    if not found:
        raise CLIError(f"--model {path}: {MODEL_INDEX} lists no denoiser (a model whose forward takes a timestep)")
    library, class_name = index[found[0]]
    with quiet_libraries(verbose):
        cls = getattr(importlib.import_module(library), class_name)
        return cls.from_pretrained(folder, subfolder=found[0]).eval()


def read_lora(path: str, denoiser: Optional[torch.nn.Module], args: argparse.Namespace) -> Any:
    """Any T-LoRA file in PEFT form, its schedule from the file and the command line's overrides.

    A file with a schedule takes ``--max-rank/--min-rank/--alpha`` as overrides (the user asked
    for them); a file without one takes ``--min-rank/--alpha`` (``--max-rank`` defaults to the
    file's rank) or ``--lycoris-config``. The layout is the file's business.
    """
    from ..io import read_tlora
    from ..io.common import NeedsInputError

    overrides = schedule_overrides(args)
    options = {"lycoris_config": args.lycoris_config} if getattr(args, "lycoris_config", None) else {}
    given, path = path, str(local_lora(path))
    try:
        converted = read_tlora(path, denoiser, **options)
    except NeedsInputError as e:
        if e.needs == "denoiser" and "kohya" in str(e):
            raise CLIError(
                f"{given}: the module names of this kohya file are resolved against the base model's own modules, "
                "so pass --model PATH (the pipeline folder it was trained on)"
            ) from None
        if e.needs == "denoiser":
            raise CLIError(
                f"{given}: a LyCORIS/SimpleTuner T-LoRA does not store its frozen base; it is rebuilt from the base "
                "model's weights, so pass --model PATH (the pipeline folder it was trained on)"
            ) from None
        rank = e.partial.get("rank")
        if not overrides:
            raise CLIError(
                f"{given} carries no T-LoRA schedule: pass the one it was trained with, --min-rank M --alpha A "
                f"(--max-rank defaults to the file's rank, {rank})"
                + (", or --lycoris-config FILE (SimpleTuner's lycoris_config.json)" if "lycoris" in str(e) else "")
            ) from None
        if "max_rank" in overrides and overrides["max_rank"] != rank:
            raise CLIError(f"--max-rank {overrides['max_rank']} does not fit {given}: its rank is {rank}; leave "
                           "--max-rank out") from None
        try:
            return read_tlora(path, denoiser, min_rank=overrides.get("min_rank", 1),
                              alpha=overrides.get("alpha", 1.0), **options)
        except ValueError as error:
            raise CLIError(f"invalid --min-rank/--alpha: {error}") from None
    if not overrides:
        return converted
    file_cfg = converted.meta.config
    if "max_rank" in overrides and overrides["max_rank"] != file_cfg.max_rank:
        raise CLIError(
            f"--max-rank {overrides['max_rank']} does not fit {given}: its rank is {file_cfg.max_rank} "
            f"(layout {file_cfg.layout!r}); a T-LoRA masks the LoRA's own ranks, so leave --max-rank out"
        )
    try:
        cfg = dataclasses.replace(file_cfg, **overrides)
    except ValueError as e:
        raise CLIError(f"invalid --max-rank/--min-rank/--alpha: {e}") from None
    converted.meta = dataclasses.replace(converted.meta, config=cfg)
    return converted


def local_lora(text: str, flag: str = "--lora") -> Path:
    """:func:`lora_source`, made local: a Hub file is taken from the cache or downloaded (as diffusers does)."""
    from ..io.load import _from_hub, resolve_path

    source = lora_source(text, flag)
    if not source.startswith("hf://"):
        return resolve_path(source)
    parts = source[len("hf://"):].strip("/").split("/")
    options = {"weight_name": "/".join(parts[2:])} if len(parts) > 2 else {}
    return resolve_path(_from_hub("/".join(parts[:2]), options))


def load_lora(pipe: Any, path: str, args: argparse.Namespace) -> Any:
    """:func:`read_lora`, then load it onto the pipeline's denoiser; returns :class:`~tlora_diffusers.io.LoadedTLoRA`."""
    from ..io.load import denoiser_of, load_converted

    converted = read_lora(path, denoiser_of(pipe), args)
    return load_converted(pipe, converted, local_lora(path))
