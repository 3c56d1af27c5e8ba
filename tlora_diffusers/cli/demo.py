"""`tlora-diffusers demo`: a LoRA and a T-LoRA taught one unseen concept on the shipped scenes model (offline)."""

from __future__ import annotations

import argparse
from typing import Sequence

from ._common import CLIError, add_threads, non_negative_int, positive_int, quiet_libraries, use_threads
from ._help import HelpFormatter

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  tlora-diffusers demo                         # writes ./tlora-demo in about 2 minutes on 2 CPU cores
  tlora-diffusers demo --out /tmp/demo --train-steps 500 --rank 16 --seed 3

It trains a LoRA and a T-LoRA of the same rank on one generated image of a shape the
shipped scenes model has never seen ("a sks shape"), loads both into the stock pipeline
with load_lora_weights, and samples prompts that keep or change the context. Outputs:
grid.png (rows: LoRA, T-LoRA masked, the same T-LoRA unmasked, base; columns: the training
image and the prompts), summary.json (metrics and their meaning, files, commands to go on).
"""


def add_parser(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo", parents=parents, epilog=EPILOG, formatter_class=HelpFormatter,
        help="offline demo on the shipped scenes model: train LoRA and T-LoRA on one image, compare",
        description="Teach the shipped scenes model an unseen shape with a LoRA and a T-LoRA, and compare them.",
    )
    p.add_argument("--out", default="tlora-demo", metavar="DIR", help="output folder")
    p.add_argument("--train-steps", type=positive_int, default=400, metavar="N", help="training steps of each adapter")
    p.add_argument("--rank", type=positive_int, default=8, metavar="R", help="rank of both adapters")
    p.add_argument("--min-rank", type=non_negative_int, default=1, metavar="M",
                   help="the T-LoRA's ranks at the noisiest step (the library's default; the LoRA has all R)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of both adapters")
    p.add_argument("--seed", type=int, default=0, help="picks the concept and seeds training and sampling")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_threads(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    if args.min_rank >= args.rank:
        raise CLIError(f"--min-rank must be below --rank={args.rank} (min_rank = rank is the LoRA the demo trains "
                       f"beside it), got {args.min_rank}")
    use_threads(args)
    with quiet_libraries(args.verbose):
        s = run_demo(args.out, steps=args.train_steps, rank=args.rank, min_rank=args.min_rank, learning_rate=args.lr,
                     seed=args.seed, progress=not args.quiet)
    c = s["concept"]
    print(f"concept: a {c['colour']} striped {c['shape']} (never seen by the base model), rank {s['rank']}, "
          f"T-LoRA min_rank {s['min_rank']}, {s['steps']} steps each")
    print(f"{'':18} {'IS':>5} {'TS':>5} {'copy':>5}   IS: concept similarity, TS: prompt following, copy: kept the "
          "training context")
    for label, m in s["metrics"].items():
        print(f"{label:18} {m['IS']:5.2f} {m['TS']:5.2f} {m['copy_rate']:5.2f}")
    print(f"\nwhat to look for: {s['look_for']}\n")
    for name, path in s["files"].items():
        print(f"{name:>15}: {path}")
    print(f"\nnext: {s['commands']['generate']}\n      {s['commands']['inspect']}")
    print(f"demo took {s['seconds']:.0f} s; output folder: {s['output_dir']}")
    return 0
