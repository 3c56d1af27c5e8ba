"""`tlora-diffusers demo`: the whole idea, offline, in a few minutes on a CPU (``tlora_diffusers.demo``)."""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from ._help import HelpFormatter
from ._common import positive_int, quiet_libraries

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  tlora-diffusers demo                       # tiny offline SDXL-style model, writes ./tlora-demo
  tlora-diffusers demo --out /tmp/demo --train-steps 400
  tlora-diffusers demo --model ./my-sdxl --resolution 512 --threads 8

It trains a T-LoRA on one generated image, saves it, loads it back into the stock
pipeline and samples the same prompts with the T-LoRA mask, without it, and with the
base model. Outputs: grid.png, schedule.png, summary.json, the LoRA file.
"""


def add_parser(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo", parents=parents, epilog=EPILOG, formatter_class=HelpFormatter,
        help="offline end-to-end demo: train, save, load, compare masked vs unmasked",
        description="Train a T-LoRA on one generated image and compare masked, unmasked and base samples, offline.",
    )
    p.add_argument("--out", default="tlora-demo", metavar="DIR", help="output folder (default ./tlora-demo)")
    p.add_argument("--model", metavar="PATH", help="local SDXL-style diffusers folder (default: a tiny one built here)")
    p.add_argument("--train-steps", type=positive_int, default=200)
    p.add_argument("--sample-steps", type=positive_int, default=25)
    p.add_argument("--resolution", type=positive_int, default=64)
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default 1 for the tiny model: more threads are slower there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..demo import run_demo

    torch.set_num_threads(args.threads or (1 if args.model is None else max(1, (os.cpu_count() or 2) // 2)))
    with quiet_libraries(args.verbose):
        summary = run_demo(args.out, model=args.model, steps=args.train_steps, rank=args.rank,
                           resolution=args.resolution, sample_steps=args.sample_steps, seed=args.seed,
                           progress=not args.quiet)
    sat = summary["saturation"]
    print(f"trained {summary['train']['steps']} steps in {summary['train']['seconds']} s; probe loss "
          f"{summary['train']['probe_loss_start']:.4f} -> {summary['train']['probe_loss_end']:.4f}")
    print(f"saturation: masked {sat['masked']:.3f}, unmasked {sat['unmasked']:.3f}, base {sat['base']:.3f}")
    for name, path in summary["files"].items():
        print(f"{name:>9}: {path}")
    print(f"demo output folder: {summary['output_dir']}")
    return 0
