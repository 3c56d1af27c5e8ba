"""`tlora-diffusers train`: single-image T-LoRA DreamBooth (``tlora_diffusers.training.train``)."""

from __future__ import annotations

import argparse
from typing import Sequence

from ._help import HelpFormatter
from ._common import non_negative_int, positive_int, quiet_libraries

__all__ = ["add_parser", "run"]


EPILOG = """\
examples:
  tlora-diffusers train --model ./sdxl --images ./dog --prompt "a photo of sks dog" --out out/
  tlora-diffusers train --model ./sdxl --images dog.png --prompt "a sks dog" --variant ortho \\
      --rank 64 --min-rank 32 --sig-type last --steps 800 --out out-ortho/
  tlora-diffusers train ... --checkpoint-every 100 --resume         # continue an interrupted run
  tlora-diffusers train ... --resume --steps 1200                   # extend a finished 800-step run
  tlora-diffusers train ... --push-to-hub --hub-model-id me/sks-dog-tlora
  accelerate launch --multi_gpu --num_processes 2 -m tlora_diffusers.cli train ...  # 2 processes (GPUs, or CPUs)

The result, out/pytorch_lora_weights.safetensors, loads with stock diffusers:
  pipe.load_lora_weights("out/"); TLoRAPatch(pipe)   # the schedule comes from the file
out/README.md is its model card (base model, prompt, T-LoRA config, how to use it).
"""


def add_parser(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "train", parents=parents, epilog=EPILOG, formatter_class=HelpFormatter,
        help="train a T-LoRA on one or a few images",
        description="Train a T-LoRA (vanilla or ortho) on a few instance images of a local pipeline "
                    "(SD 1.x, SDXL, Flux, Flux2 Klein).",
    )
    p.add_argument("--model", required=True, metavar="PATH", help="local diffusers pipeline folder")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH", help="an image folder or image files")
    p.add_argument("--prompt", required=True, help='instance prompt with a placeholder token, e.g. "a photo of sks dog"')
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (weights, checkpoints, logs, model card)")
    p.add_argument("--resolution", type=positive_int, default=512, help="training image side in pixels")
    p.add_argument("--steps", type=positive_int, default=800,
                   help="training steps (with --resume: the total, so a larger value extends a finished run)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (constant)")
    p.add_argument("--rank", type=positive_int, default=16, help="LoRA rank = T-LoRA max_rank")
    p.add_argument("--min-rank", type=non_negative_int, default=1, help="ranks active at the noisiest step")
    p.add_argument("--alpha", type=float, default=1.0, help="schedule exponent (1 = linear)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: the rank)")
    p.add_argument("--variant", choices=("vanilla", "ortho"), default="vanilla", help="plain LoRA or the paper's ortho")
    p.add_argument("--sig-type", choices=("principal", "last", "middle"), default="last",
                   help="ortho: which SVD triplets initialise it")
    p.add_argument("--ortho-init", choices=("random", "weight"), default="random",
                   help="ortho: SVD of a random matrix or of the layer weight")
    p.add_argument("--ortho-reg", type=float, default=1e-4, help="ortho: weight of the orthogonality regulariser")
    p.add_argument("--targets", nargs="+", metavar="NAME",
                   help="module names (or regexes) to train (default: the model family's attention and feed-forward)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="samples per step and process")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="accelerate's autocast")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, noise and timesteps")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="steps between checkpoints (0: only at the end)")
    p.add_argument("--validation-prompt", action="append", default=[], metavar="TEXT",
                   help="render this prompt at each checkpoint and at the end (repeatable; default: none)")
    p.add_argument("--validation-steps", type=positive_int, default=25, help="sampling steps of validation images")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    group.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--push-to-hub", action="store_true", help="upload --out (weights, model card) to the Hugging Face Hub")
    p.add_argument("--hub-model-id", metavar="USER/REPO", help="Hub repo for --push-to-hub (default: the --out name)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, train

    images = args.images[0] if len(args.images) == 1 else args.images
    cfg = TrainConfig(
        model=args.model, images=images, prompt=args.prompt, output_dir=args.out, resolution=args.resolution,
        steps=args.steps, learning_rate=args.lr, rank=args.rank, min_rank=args.min_rank, alpha=args.alpha,
        lora_alpha=args.lora_alpha, variant=args.variant, sig_type=args.sig_type, ortho_init=args.ortho_init,
        ortho_reg=args.ortho_reg, target_modules=args.targets, batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision=args.mixed_precision, seed=args.seed, checkpoint_every=args.checkpoint_every,
        validation_prompts=args.validation_prompt, validation_steps=args.validation_steps, resume=args.resume,
        overwrite=args.overwrite, progress=not args.quiet, push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
    )
    with quiet_libraries(args.verbose):
        result = train(cfg)
    if not result.main_process:
        return 0
    print(f"loss {result.probe_loss_start:.4f} -> {result.probe_loss_end:.4f} (fixed probe set, masked)")
    print(f"wrote {result.output_file} and its model card {result.output_file.parent / 'README.md'}")
    return 0
