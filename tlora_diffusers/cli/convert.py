"""`tlora-diffusers convert`: any T-LoRA file to ours, to kohya, to the ComfyUI-T-LoRA layout, or to a static LoRA."""

from __future__ import annotations

import argparse
from typing import Sequence

from ._common import CLIError, add_schedule_overrides, load_denoiser, lora_source, quiet_libraries, read_lora
from ._help import HelpFormatter

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  tlora-diffusers convert simpletuner-out/ converted/ --model ./sdxl
  tlora-diffusers convert lycoris.safetensors converted/ --model ./sdxl --min-rank 2 --alpha 1.5
  tlora-diffusers convert lycoris.safetensors converted/ --model ./sdxl --lycoris-config lycoris_config.json
  tlora-diffusers convert checkpoint-800/pytorch_lora_weights.safetensors t.safetensors --min-rank 32
  tlora-diffusers convert out/ sks-dog-kohya.safetensors --to kohya          # kohya tools, the sd-scripts fork
  tlora-diffusers convert out/ sks-dog-comfy.safetensors --to comfyui-tlora  # prints the node settings to type
  tlora-diffusers convert scenes-example static.safetensors --to static       # unmasked, for any LoRA loader
  tlora-diffusers convert sdscripts_tlora.safetensors ours/ --model ./sdxl    # a kohya-side T-LoRA to ours

--to tlora (the default) writes a diffusers LoRA safetensors that carries its T-LoRA config: stock
pipe.load_lora_weights(OUT) loads it and TLoRAPatch(pipe) masks it with no arguments.
LyCORIS/SimpleTuner files need --model (their frozen base is rebuilt from its weights).
Files without a schedule need --min-rank (and --alpha, default 1.0); the rank is the file's.
"""


def add_parser(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "convert", parents=parents, epilog=EPILOG, formatter_class=HelpFormatter,
        help="convert a T-LoRA file: to ours, to kohya, to the ComfyUI-T-LoRA layout, or to a static LoRA",
        description="Convert any supported T-LoRA file to tlora_diffusers' format, or export it for kohya tools, "
                    "the ComfyUI-T-LoRA node or any LoRA loader (written atomically; an existing OUT needs --overwrite).",
    )
    p.add_argument("src", metavar="IN", help="a T-LoRA file, or a folder holding one")
    p.add_argument("dst", metavar="OUT", help="a .safetensors path, or a folder (pytorch_lora_weights.safetensors)")
    p.add_argument("--to", choices=("tlora", "kohya", "comfyui-tlora", "static"), default="tlora",
                   help="tlora: ours; kohya: lora_unet_* keys, .alpha tensors, ss_tlora_* metadata; comfyui-tlora: "
                        "the attention-processor layout the ComfyUI-T-LoRA node masks; static: a plain, unmasked LoRA")
    p.add_argument("--kohya-names", choices=("auto", "sgm", "diffusers"), default="auto",
                   help="--to kohya: module names of a UNet; sgm: SDXL's as sd-scripts names them (input_blocks_...), "
                        "diffusers: down_blocks_... (ComfyUI loads both); auto: sgm for an SDXL UNet (decided from "
                        "--model's config when given, else from the LoRA's modules)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--model", metavar="PATH",
                   help="local diffusers folder of the base model (default: none; LyCORIS files need it)")
    add_schedule_overrides(p, "schedule", "the T-LoRA config, for files that carry none (or to replace fields of it)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..io.export import export_converted
    from ..io.inspect import output_path

    lora_source(args.src, "IN")
    try:
        target = output_path(args.dst, args.to)
    except ValueError as e:
        raise CLIError(f"OUT {e}") from None
    if target.exists() and not args.overwrite:
        raise CLIError(f"OUT {target}: already exists; pass --overwrite to replace it")
    denoiser = load_denoiser(args.model, args.verbose) if args.model else None
    with quiet_libraries(args.verbose):
        converted = read_lora(args.src, denoiser, args)
        exported = export_converted(converted, target, args.to, kohya_names=args.kohya_names,
                                    unet_config=getattr(denoiser, "config", None) if denoiser is not None else None)
    print(f"wrote {exported.path}" + (f" ({exported.format})" if exported.format != "tlora" else ""))
    for note in exported.notes:
        print(note)
    return 0
