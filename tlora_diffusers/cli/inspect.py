"""`tlora-diffusers inspect`: what a T-LoRA file is (``tlora_diffusers.io.inspect.inspect_tlora``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Sequence

from ._common import io_function, load_denoiser

__all__ = ["add_parser", "run", "render"]

EPILOG = """\
examples:
  tlora-diffusers inspect out/pytorch_lora_weights.safetensors
  tlora-diffusers inspect simpletuner-out/ --model ./sdxl      # LyCORIS: map names, check the fit
  tlora-diffusers inspect lora.pt --json | jq .config

Nothing is loaded onto a model; --model loads only its unet/transformer (some formats
need it to name their modules, and it checks that the file fits that model).
"""


def add_parser(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "inspect", parents=parents, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="describe a T-LoRA file: format, schedule, rank, modules",
        description="Describe any supported T-LoRA file: format, schedule, rank, layers and metadata.",
    )
    p.add_argument("file", help="a T-LoRA file, or a folder with pytorch_lora_weights.safetensors / lora.pt")
    p.add_argument("--model", metavar="PATH", help="local diffusers folder of the base model")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items() if k != "format_version") or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None or value == "" else str(value)


def render(report: Any) -> str:
    """The report for people: one line per field, module patterns below, metadata keys last.

    ``--json`` prints everything, metadata values included.
    """
    report = _plain(report)
    if not isinstance(report, dict):
        return str(report)
    report = dict(report)
    modules, metadata = report.pop("modules", None), report.pop("metadata", None)
    lines = [f"{key}: {_inline(value)}" for key, value in report.items()]
    if modules:
        lines.append("modules:")
        items = modules.items() if isinstance(modules, dict) else ((m, None) for m in modules)
        lines += [f"  {name}" + ("" if count is None else f": {count}") for name, count in items]
    if metadata:
        lines.append(f"metadata: {', '.join(map(str, metadata))} (values with --json)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    inspect_tlora = io_function("inspect_tlora", "inspect")
    denoiser = load_denoiser(args.model, args.verbose) if args.model else None
    report = inspect_tlora(args.file, denoiser=denoiser)
    print(json.dumps(_plain(report), indent=2, default=str) if args.json else render(report))
    return 0
