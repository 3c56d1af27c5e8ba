"""`tlora-diffusers convert`: any T-LoRA file to our format (``tlora_diffusers.convert_tlora``)."""

from __future__ import annotations

import argparse
from typing import Sequence

from ._help import HelpFormatter
from ._common import add_schedule_overrides, load_denoiser, quiet_libraries, read_lora

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  tlora-diffusers convert simpletuner-out/ converted/ --model ./sdxl
  tlora-diffusers convert lycoris.safetensors converted/ --model ./sdxl --min-rank 2 --alpha 1.5
  tlora-diffusers convert lycoris.safetensors converted/ --model ./sdxl --lycoris-config lycoris_config.json
  tlora-diffusers convert checkpoint-800/pytorch_lora_weights.safetensors t.safetensors --min-rank 32

The output is a diffusers LoRA safetensors that carries its T-LoRA config: stock
pipe.load_lora_weights(OUT) loads it and TLoRAPatch(pipe) masks it with no arguments.
LyCORIS/SimpleTuner files need --model (their frozen base is rebuilt from its weights).
Files without a schedule need --min-rank (and --alpha, default 1.0); the rank is the file's.
"""


def add_parser(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "convert", parents=parents, epilog=EPILOG, formatter_class=HelpFormatter,
        help="convert a T-LoRA file to tlora_diffusers' self-describing safetensors",
        description="Convert any supported T-LoRA file to tlora_diffusers' format (written atomically).",
    )
    p.add_argument("src", metavar="IN", help="a T-LoRA file, or a folder holding one")
    p.add_argument("dst", metavar="OUT", help="a .safetensors path, or a folder (pytorch_lora_weights.safetensors)")
    p.add_argument("--model", metavar="PATH",
                   help="local diffusers folder of the base model (default: none; LyCORIS files need it)")
    add_schedule_overrides(p, "schedule", "the T-LoRA config, for files that carry none (or to replace fields of it)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..io.inspect import write_converted

    denoiser = load_denoiser(args.model, args.verbose) if args.model else None
    with quiet_libraries(args.verbose):
        converted = read_lora(args.src, denoiser, args)
    print(f"wrote {write_converted(converted, args.dst)}")
    return 0
