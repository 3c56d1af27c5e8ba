"""`tlora-diffusers train`: single-image T-LoRA DreamBooth (``tlora_diffusers.training.train``)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Sequence

from ._common import CLIError, add_threads, non_negative_int, positive_int, quiet_libraries, scenes_alias, use_threads
from ._help import HelpFormatter

__all__ = ["add_parser", "run"]


EPILOG = """\
examples:
  tlora-diffusers train --model scenes --images concept.png --prompt "a sks shape" --steps 400 --lr 3e-3 \\
      --rank 8 --out sks-shape/                  # the shipped scenes model: minutes on a CPU
  tlora-diffusers train --model ./sdxl --images ./dog --prompt "a photo of sks dog" --out out/
  tlora-diffusers train --model ./sdxl --images dog.png --prompt "a sks dog" --variant ortho \\
      --rank 64 --min-rank 32 --sig-type last --steps 800 --out out-ortho/
  tlora-diffusers train --out out/ --resume                          # continue an interrupted run
  tlora-diffusers train --out out/ --resume --steps 1200             # extend a finished 800-step run
  tlora-diffusers train ... --push-to-hub --hub-model-id me/sks-dog-tlora
  accelerate launch --multi_gpu --num_processes 2 -m tlora_diffusers.cli train ...  # 2 processes (GPUs, or CPUs)

The result, out/pytorch_lora_weights.safetensors, loads with stock diffusers:
  pipe.load_lora_weights("out/"); TLoRAPatch(pipe)   # the schedule comes from the file
out/README.md is its model card (base model, prompt, T-LoRA config, how to use it).
"""


#: TrainConfig field -> its flag, longest first (messages from the library are rewritten with these).
FLAGS = {
    "TLoRAConfig.max_rank": "--rank", "TLoRAConfig.min_rank": "--min-rank", "TLoRAConfig.alpha": "--alpha",
    "gradient_accumulation_steps": "--grad-accum", "gradient_checkpointing": "--gradient-checkpointing",
    "validation_prompts": "--validation-prompt", "validation_steps": "--validation-steps",
    "checkpoint_every": "--checkpoint-every", "mixed_precision": "--mixed-precision", "target_modules": "--targets",
    "learning_rate": "--lr", "hub_model_id": "--hub-model-id", "push_to_hub": "--push-to-hub",
    "output_dir": "--out", "ortho_init": "--ortho-init", "ortho_reg": "--ortho-reg", "lora_alpha": "--lora-alpha",
    "batch_size": "--batch-size", "resolution": "--resolution", "sig_type": "--sig-type", "min_rank": "--min-rank",
    "max_rank": "--rank", "variant": "--variant", "images": "--images", "prompt": "--prompt", "model": "--model",
    "steps": "--steps", "alpha": "--alpha", "rank": "--rank", "seed": "--seed", "resume": "--resume",
    "overwrite": "--overwrite",
}
#: Options and their defaults for a new run (a resumed run takes the saved ones): dest -> (TrainConfig field, default).
OPTIONS = {
    "model": ("model", None), "images": ("images", None), "prompt": ("prompt", None), "resolution": ("resolution", None),
    "steps": ("steps", 800), "lr": ("learning_rate", 1e-4), "rank": ("rank", 16), "min_rank": ("min_rank", 1),
    "alpha": ("alpha", 1.0), "lora_alpha": ("lora_alpha", None), "variant": ("variant", "vanilla"),
    "sig_type": ("sig_type", "last"), "ortho_init": ("ortho_init", "random"), "ortho_reg": ("ortho_reg", 1e-4),
    "targets": ("target_modules", None), "batch_size": ("batch_size", 1), "grad_accum": ("gradient_accumulation_steps", 1),
    "mixed_precision": ("mixed_precision", "no"), "seed": ("seed", 0), "checkpoint_every": ("checkpoint_every", 0),
    "validation_steps": ("validation_steps", 25),
}


def add_parser(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "train", parents=parents, epilog=EPILOG, formatter_class=HelpFormatter,
        help="train a T-LoRA on one or a few images",
        description="Train a T-LoRA (vanilla or ortho) on a few instance images of a local pipeline "
                    "(SD 1.x, SDXL, Flux, Flux2 Klein). With --resume only --out is needed: the run's saved "
                    "settings are used, and flags given must agree with them (--steps may grow).",
    )
    p.add_argument("--model", metavar="PATH",
                   help="local diffusers pipeline folder, or `scenes` for the shipped scenes model (required for a "
                        "new run; default with --resume: the run's)")
    p.add_argument("--images", nargs="+", metavar="PATH", help="an image folder or image files (required for a new run; default with --resume: the run's)")
    p.add_argument("--prompt", help='instance prompt with a placeholder token, e.g. "a photo of sks dog" (required for a '
                   "new run; default with --resume: the run's)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (weights, checkpoints, logs, model card)")
    p.add_argument("--resolution", type=positive_int,
                   help="training image side in pixels (default: the model's, e.g. 32 for scenes, 1024 for SDXL)")
    p.add_argument("--steps", type=positive_int,
                   help="training steps (with --resume: the total, so a larger value extends a finished run) "
                        "(default: 800)")
    p.add_argument("--lr", type=float, help="learning rate, constant (default: 1e-4)")
    p.add_argument("--rank", type=positive_int, help="LoRA rank = T-LoRA max_rank (default: 16)")
    p.add_argument("--min-rank", type=non_negative_int,
                   help="ranks active at the noisiest step (default: 1; in the README's experiment neither 1 nor "
                        "rank/2 was consistently better)")
    p.add_argument("--alpha", type=float, help="schedule exponent, 1 = linear (default: 1.0)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default: the rank)")
    p.add_argument("--variant", choices=("vanilla", "ortho"), help="plain LoRA or the paper's ortho (default: vanilla)")
    p.add_argument("--sig-type", choices=("principal", "last", "middle"),
                   help="ortho: which SVD triplets initialise it (default: last)")
    p.add_argument("--ortho-init", choices=("random", "weight"),
                   help="ortho: SVD of a random matrix or of the layer weight (default: random)")
    p.add_argument("--ortho-reg", type=float, help="ortho: weight of the orthogonality regulariser (default: 1e-4)")
    p.add_argument("--targets", nargs="+", metavar="NAME",
                   help="module names (or regexes) to train (default: the model family's attention and feed-forward)")
    p.add_argument("--batch-size", type=positive_int, help="samples per step and process (default: 1)")
    p.add_argument("--grad-accum", type=positive_int, help="gradient accumulation steps (default: 1)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="accelerate's autocast (default: no)")
    p.add_argument("--seed", type=int, help="seed of the weights, noise and timesteps (default: 0)")
    p.add_argument("--checkpoint-every", type=non_negative_int,
                   help="steps between checkpoints, 0: only at the end (default: 0)")
    p.add_argument("--validation-prompt", action="append", default=[], metavar="TEXT",
                   help="render this prompt at each checkpoint and at the end (repeatable; default: none)")
    p.add_argument("--validation-steps", type=positive_int, help="sampling steps of validation images (default: 25)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint, with its saved settings")
    group.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--push-to-hub", action="store_true",
                   help="upload --out (weights, model card) to the Hugging Face Hub (login and network are checked "
                        "before training)")
    p.add_argument("--hub-model-id", metavar="USER/REPO", help="Hub repo for --push-to-hub (default: the --out name)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_threads(p)
    p.set_defaults(run=run)


def in_flags(message: str) -> str:
    """A library message in the command line's words: ``learning_rate`` -> ``--lr``, ``output_dir`` -> ``--out``."""
    for field, flag in FLAGS.items():
        message = re.sub(rf"(?<![\w.-]){re.escape(field)}(?![\w])", flag, message)
    return message


def _saved(out: str) -> dict:
    from ..training.trainer import RUN_FILE

    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise CLIError(f"--resume: {out} holds no run to resume ({RUN_FILE} missing); start it without --resume")
    try:
        return json.loads(path.read_text())["config"]
    except (ValueError, KeyError) as e:
        raise CLIError(f"--resume: {path} is not a run file of tlora-diffusers train ({e})") from None


def config_from_args(args: argparse.Namespace) -> Any:
    """The ``TrainConfig`` of the command line: flags, else (with ``--resume``) the run's saved settings, else defaults."""
    from ..training import TrainConfig

    saved = _saved(args.out) if args.resume else {}
    values = {}
    for dest, (field, default) in OPTIONS.items():
        given = getattr(args, dest)
        values[field] = given if given is not None else saved.get(field, default)
    if args.model is not None:
        values["model"] = scenes_alias(args.model)
    if args.images is not None:
        values["images"] = args.images[0] if len(args.images) == 1 else args.images
    missing = [f"--{d}" for d in ("model", "images", "prompt") if values[d] is None]
    if missing:
        raise CLIError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required for a new run "
                       "(with --resume they come from the run in --out)")
    for flag in ("gradient_checkpointing", "push_to_hub"):
        values[flag] = getattr(args, flag) or bool(saved.get(flag, False))
    values["validation_prompts"] = args.validation_prompt or saved.get("validation_prompts", [])
    values["hub_model_id"] = args.hub_model_id if args.hub_model_id is not None else saved.get("hub_model_id")
    try:
        return TrainConfig(output_dir=args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                           **values)
    except ValueError as e:
        raise CLIError(in_flags(str(e))) from None


def run(args: argparse.Namespace) -> int:
    from ..training import train

    use_threads(args)
    cfg = config_from_args(args)
    try:
        with quiet_libraries(args.verbose):
            result = train(cfg)
    except ValueError as e:
        raise CLIError(in_flags(str(e))) from None
    if not result.main_process:
        return 0
    for note in result.notes:
        print(f"note: {note}")
    print(f"loss {result.probe_loss_start:.4f} -> {result.probe_loss_end:.4f} (fixed probe set, masked)")
    print(f"wrote {result.output_file} and its model card {result.output_file.parent / 'README.md'}")
    return 0
