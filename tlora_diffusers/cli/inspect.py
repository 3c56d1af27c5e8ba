"""`tlora-diffusers inspect`: what a T-LoRA file is (``tlora_diffusers.io.inspect.inspect_tlora``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Sequence

from ._help import HelpFormatter
from ._common import load_denoiser, quiet_libraries

__all__ = ["add_parser", "run"]

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
        "inspect", parents=parents, epilog=EPILOG, formatter_class=HelpFormatter,
        help="describe a T-LoRA file: format, schedule, rank, modules",
        description="Describe any supported T-LoRA file: format, schedule, rank, layers and metadata.",
    )
    p.add_argument("file", help="a T-LoRA file, or a folder with pytorch_lora_weights.safetensors / lora.pt")
    p.add_argument("--model", metavar="PATH",
                   help="local diffusers folder of the base model: checks the fit, names LyCORIS modules "
                        "(default: none)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return dict(value) if isinstance(value, dict) else value


def run(args: argparse.Namespace) -> int:
    from ..io import inspect_tlora

    denoiser = load_denoiser(args.model, args.verbose) if args.model else None
    with quiet_libraries(args.verbose):
        report = inspect_tlora(args.file, denoiser=denoiser)
    print(json.dumps(_plain(report), indent=2, default=str) if args.json else str(report))
    return 0
