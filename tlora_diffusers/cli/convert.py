"""`tlora-diffusers convert`: any T-LoRA file to our format (``tlora_diffusers.io.inspect.convert_tlora``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ._common import add_schedule_overrides, io_function, load_denoiser, overridden_config, schedule_overrides

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  tlora-diffusers convert simpletuner-out/ converted/ --model ./sdxl
  tlora-diffusers convert checkpoint-800/pytorch_lora_weights.safetensors t.safetensors \\
      --max-rank 64 --min-rank 32 --alpha 1

The output is a diffusers LoRA safetensors that carries its T-LoRA config: stock
pipe.load_lora_weights(OUT) loads it and TLoRAPatch(pipe) masks it with no arguments.
LyCORIS files need --model (their frozen base is rebuilt from its weights). Files without
a schedule need --max-rank (--min-rank defaults to 1, --alpha to 1.0, as in TLoRAConfig).
"""


def add_parser(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "convert", parents=parents, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="convert a T-LoRA file to tlora_diffusers' self-describing safetensors",
        description="Convert any supported T-LoRA file to tlora_diffusers' format (written atomically).",
    )
    p.add_argument("src", metavar="IN", help="a T-LoRA file, or a folder holding one")
    p.add_argument("dst", metavar="OUT", help="a .safetensors path, or a folder (pytorch_lora_weights.safetensors)")
    p.add_argument("--model", metavar="PATH", help="local diffusers folder of the base model")
    add_schedule_overrides(p, "schedule", "the T-LoRA config, for files that carry none")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = overridden_config(None, schedule_overrides(args))
    convert_tlora = io_function("convert_tlora", "convert")
    denoiser = load_denoiser(args.model, args.verbose) if args.model else None
    written = convert_tlora(args.src, args.dst, denoiser=denoiser, cfg=cfg)
    print(f"wrote {written if isinstance(written, (str, Path)) else args.dst}")
    return 0
