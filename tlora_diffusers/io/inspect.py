"""Look inside any supported T-LoRA file, and convert it to our self-describing format.

``inspect_tlora`` reports what a file is without loading it anywhere; ``convert_tlora``
writes any supported file as a diffusers LoRA safetensors that carries its T-LoRA config
(:func:`tlora_diffusers.io.save_tlora`, atomic), which stock ``pipe.load_lora_weights``
then loads and ``TLoRAPatch(pipe)`` masks without further arguments.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

from ..config import TLoRAConfig
from .format import save_tlora
from .common import NeedsInputError
from .formats import ConvertedTLoRA, detect_format
from .load import check_modules, denoiser_of, read_tensors, read_tlora, resolve_path

__all__ = ["inspect_tlora", "convert_tlora", "write_converted", "output_path", "compress_names", "TLoRAReport"]

_INDEX = re.compile(r"(?<=[._])\d+(?=[._]|$)")


def compress_names(names: list[str]) -> dict[str, int]:
    """Module names with block indices replaced by ``*``, and how many names each pattern stands for.

    Example:
        >>> compress_names(["blocks.0.attn.to_q", "blocks.1.attn.to_q", "blocks.0.ff"])
        {'blocks.*.attn.to_q': 2, 'blocks.*.ff': 1}
    """
    return dict(Counter(_INDEX.sub("*", n) for n in names))


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items() if k != "format_version") or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None or value == "" else str(value)


class TLoRAReport(dict):
    """What :func:`inspect_tlora` found: a dict (JSON-ready) whose ``str()`` is a short report for people.

    ``print(report)`` shows one line per field, module patterns below and metadata keys last;
    ``report["config"]`` and ``json.dumps(report)`` give everything.
    """

    def __str__(self) -> str:
        report = dict(self)
        modules, metadata = report.pop("modules", None), report.pop("metadata", None)
        report.pop("description", None)
        lines = [f"{key}: {_inline(value)}" for key, value in report.items()]
        if modules:
            lines.append("modules:")
            items = modules.items() if isinstance(modules, dict) else ((m, None) for m in modules)
            lines += [f"  {name}" + ("" if count is None else f": {count}") for name, count in items]
        if metadata:
            lines.append(f"metadata: {', '.join(map(str, metadata))} (values: report['metadata'] or --json)")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython / notebooks
        printer.text(str(self))


def _parsed_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        try:
            out[key] = json.loads(value) if value.lstrip()[:1] in ("{", "[") else value
        except ValueError:
            out[key] = value
    return out


def _describe(converted: ConvertedTLoRA) -> dict[str, Any]:
    cfg = converted.meta.config
    modules = sorted({k.rpartition(".lora_")[0] for k in converted.state_dict})
    return {
        "config": cfg.to_dict(), "variant": converted.meta.variant, "layout": cfg.layout, "rank": cfg.max_rank,
        "lora_rank": cfg.lora_rank, "modules": modules, "component": converted.meta.component,
        "base_model": converted.meta.base_model, "notes": list(converted.notes),
    }


def inspect_tlora(
    path: Union[str, Path], denoiser: Optional[Any] = None, **options: Any
) -> TLoRAReport:
    """What a T-LoRA file is: format, schedule (or ``"needs cfg"``), variant, rank, modules, metadata.

    Nothing is loaded onto a model. ``denoiser`` (a pipeline or denoiser) checks that the
    file fits that model and lets LyCORIS files map their names to module paths (without
    it their ``lycoris_*`` names are listed; with it and a schedule, their base is rebuilt,
    one SVD per layer). ``options`` are the format's conversion options (``min_rank=``, ...).

    Returns a :class:`TLoRAReport` (a dict; ``print`` it for a short report) with ``path``, ``format``, ``description``, ``config`` (a dict, or
    ``"needs cfg"``), ``variant``, ``layout``, ``rank`` (schedule ranks), ``lora_rank``,
    ``num_modules``, ``modules`` (:func:`compress_names` patterns), ``parameters`` (in the
    file), ``dtypes``, ``metadata`` (JSON values decoded), ``needs`` (``"cfg"`` /
    ``"denoiser"`` still missing to load it) and ``notes``.

    Example:
        >>> info = inspect_tlora("checkpoint-800/pytorch_lora_weights.safetensors")
        >>> info["format"], info["config"], info["num_modules"]
        ('controlgenai', 'needs cfg', 560)
    """
    path = resolve_path(path)
    tensors, metadata = read_tensors(path)
    fmt = detect_format(list(tensors), metadata, path)
    model = denoiser_of(denoiser) if denoiser is not None else None
    info: dict[str, Any] = {
        "path": str(path), "format": fmt.name, "description": fmt.description,
        "parameters": sum(t.numel() for t in tensors.values()), "num_tensors": len(tensors),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "metadata": _parsed_metadata(metadata), "needs": [], "notes": [],
    }
    try:
        converted = fmt.convert(path, tensors, metadata, model, None, **options)
    except NeedsInputError as e:
        info.update(e.partial)
        info["needs"] = [e.needs] + (["cfg"] if e.needs != "cfg" and info.get("config") == "needs cfg" else [])
    else:
        info.update(_describe(converted))
        if model is not None:
            check_modules(model, converted.state_dict, path)
    modules = info.pop("modules", [])
    info["num_modules"] = len(modules)
    info["modules"] = compress_names(modules)
    return TLoRAReport(info)


def convert_tlora(
    src: Union[str, Path],
    dst: Union[str, Path],
    denoiser: Optional[Any] = None,
    cfg: Optional[TLoRAConfig] = None,
    *,
    to: str = "tlora",
    overwrite: bool = False,
    kohya_names: str = "auto",
    **options: Any,
) -> Path:
    """Convert any supported T-LoRA file to ``to`` (written atomically; an existing ``dst`` needs ``overwrite``).

    ``to``: ``"tlora"`` (our self-describing format: stock ``pipe.load_lora_weights(dst)`` loads it and
    ``TLoRAPatch(pipe)`` masks it with no arguments), ``"kohya"`` (``lora_unet_*`` keys, ``.alpha``
    tensors, the schedule as ``tlora_config`` and its ``ss_tlora_*`` mirror), ``"comfyui-tlora"`` (the
    attention-processor layout the ComfyUI-T-LoRA node masks; other targets are named in a warning) or
    ``"static"`` (a plain, unmasked LoRA). ``dst`` is a folder or a ``.safetensors`` path. LyCORIS files
    need ``denoiser`` (the base model, a pipeline or its denoiser): their frozen base is rebuilt from its
    weights. Files without a schedule need ``cfg`` or the format's ``min_rank=`` / ``alpha=`` options.
    ``kohya_names`` (``to="kohya"``): ``"auto"`` (SDXL UNets in sd-scripts' SGM names, decided from ``denoiser``'s
    config when given), ``"sgm"`` or ``"diffusers"``.

    Example:
        >>> convert_tlora("simpletuner-out/", "converted/", denoiser=pipe)
        PosixPath('converted/pytorch_lora_weights.safetensors')
        >>> convert_tlora("out/", "sks-dog-kohya.safetensors", to="kohya")
        PosixPath('sks-dog-kohya.safetensors')
    """
    from .export import export_converted

    src = resolve_path(src)
    target = output_path(dst, to)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists; pass overwrite=True (--overwrite) to replace it")
    model = denoiser_of(denoiser) if denoiser is not None else None
    converted = read_tlora(src, model, cfg, **options)
    if model is not None:
        check_modules(model, converted.state_dict, src)
    exported = export_converted(converted, target, to, kohya_names=kohya_names,
                                unet_config=getattr(model, "config", None) if model is not None else None)
    if exported.dropped:
        import warnings

        warnings.warn(next(n for n in exported.notes if "left out" in n), UserWarning, stacklevel=2)
    return exported.path


def output_path(dst: Union[str, Path], to: str = "tlora") -> Path:
    """Where a conversion writes: ``dst`` if it ends in ``.safetensors``, else a file in the folder ``dst``
    (which must not be a file: ``x.txt`` is refused, not made a folder)."""
    from .format import WEIGHT_NAME

    dst = Path(dst)
    if dst.suffix == ".safetensors":
        return dst
    if dst.is_file():
        raise ValueError(f"{dst}: an existing file that is not .safetensors; name the output file.safetensors or a "
                         "folder")
    if dst.suffix and not dst.is_dir():
        raise ValueError(f"{dst}: not a .safetensors path, and a new folder named like a file ({dst.suffix}) is "
                         "most likely a typo; name the output file.safetensors, or create the folder first")
    return dst / (WEIGHT_NAME if to == "tlora" else f"tlora-{to}.safetensors")


def write_converted(converted: ConvertedTLoRA, dst: Union[str, Path]) -> Path:
    """Save an already converted T-LoRA in our format (``save_tlora``, atomic)."""
    meta = converted.meta
    if meta.source_format is None:
        meta = dataclasses.replace(meta, source_format=converted.format)
    return save_tlora(dst, converted.state_dict, meta, converted.lora_config)
