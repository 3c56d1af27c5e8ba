"""`tlora-diffusers schedule`: the rank a T-LoRA runs with at each timestep and sampling step."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from ..config import TLoRAConfig
from ..schedule import active_rank
from ._help import HelpFormatter
from ._common import CLIError, positive_int

__all__ = ["add_parser", "run", "sampling_timesteps", "TABLE_TIMESTEPS", "SCHEDULERS"]

#: Timesteps of the table: every 100, and 999 (the first SDXL step at 1000 training steps).
TABLE_TIMESTEPS = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999, 1000)
NUM_TRAIN_TIMESTEPS = 1000

#: SDXL base 1.0's ``scheduler/scheduler_config.json`` (EulerDiscreteScheduler).
SDXL_EULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
    use_karras_sigmas=False,
)
#: FLUX.1 [dev]'s scheduler config (FlowMatchEulerDiscreteScheduler, resolution-dependent shift).
FLUX_FLOW = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
SCHEDULERS = ("euler", "flow")

EPILOG = """\
examples:
  tlora-diffusers schedule --max-rank 64 --min-rank 1 --alpha 1.0 --alpha 2.0
  tlora-diffusers schedule --max-rank 64 --steps 25 --scheduler euler --plot schedule.png
  tlora-diffusers schedule --max-rank 32 --steps 28 --scheduler flow              # FLUX.1 at 1024x1024
  tlora-diffusers schedule --max-rank 32 --steps 28 --scheduler flow --shift 3.0  # SD3's static shift

Ranks follow the paper's eq. 6: r(t) = floor(((T - t) / T) ** alpha * (max_rank - min_rank)) + min_rank,
T = 1000. Timesteps are in scheduler units (0 = clean, 1000 = pure noise) for both schedulers.
--scheduler euler is SDXL's EulerDiscreteScheduler (scaled_linear betas, "leading" spacing,
steps_offset=1). --scheduler flow is FLUX.1's FlowMatchEulerDiscreteScheduler with its dynamic
shift for a --resolution x --resolution image (mu from the image token count, as FluxPipeline
computes it; 1024 gives mu = 1.15) and sigmas linspace(1, 1/steps); --shift S uses a static shift
S instead (SD3: 3.0). Flux's transformer receives timestep / 1000; tlora_diffusers converts it back.
"""


def add_parser(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "schedule", parents=parents, epilog=EPILOG, formatter_class=HelpFormatter,
        help="print (and plot) the active rank at each timestep and sampling step",
        description="Print the T-LoRA rank schedule: the active rank at timesteps 0..1000 and, with --steps, "
        "at each sampling step of a stock scheduler.",
    )
    p.add_argument("--max-rank", type=int, default=64, metavar="R", help="LoRA rank (default: 64)")
    p.add_argument("--min-rank", type=int, default=1, metavar="M", help="ranks active at t = T (default: 1)")
    p.add_argument("--alpha", type=float, action="append", metavar="A",
                   help="schedule exponent; repeat to compare several (default: 1.0)")
    p.add_argument("--steps", type=positive_int, metavar="N",
                   help="also show the rank at each of N sampling steps (default: no steps)")
    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help="scheduler for --steps: euler (SDXL, the default) or flow (FLUX.1)")
    p.add_argument("--resolution", type=positive_int, metavar="PX",
                   help="flow: image side for the dynamic shift (default: 1024)")
    p.add_argument("--shift", type=float, metavar="S",
                   help="flow: a static shift instead of the dynamic one (default: the dynamic shift)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="write rank-vs-timestep curves; .png is added without a suffix (default: no plot)")
    p.set_defaults(run=run)


def sampling_timesteps(
    scheduler: str, steps: int, *, resolution: int = 1024, shift: Optional[float] = None
) -> torch.Tensor:
    """The timesteps (scheduler units) a stock pipeline's scheduler runs for ``steps`` steps."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if scheduler == "euler":
        sched = EulerDiscreteScheduler(**SDXL_EULER)
        sched.set_timesteps(steps)
        return sched.timesteps
    if scheduler != "flow":
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if shift is not None:
        if not shift > 0:
            raise CLIError(f"--shift must be > 0, got {shift}")
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        sched.set_timesteps(steps)
        return sched.timesteps
    if resolution % 16:
        raise CLIError(f"--resolution must be a multiple of 16 (Flux packs 2x2 latent patches), got {resolution}")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = FLUX_FLOW
    mu = calculate_shift((resolution // 16) ** 2, cfg["base_image_seq_len"], cfg["max_image_seq_len"],
                         cfg["base_shift"], cfg["max_shift"])
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist(), mu=mu)
    return sched.timesteps


def _describe(scheduler: str, steps: int, resolution: int, shift: Optional[float]) -> str:
    if scheduler == "euler":
        return f"euler: SDXL's EulerDiscreteScheduler (leading spacing, steps_offset=1), {steps} steps"
    if shift is not None:
        return f"flow: FlowMatchEulerDiscreteScheduler, static shift {shift:g}, {steps} steps"
    return (f"flow: FLUX.1's FlowMatchEulerDiscreteScheduler, dynamic shift at {resolution}x{resolution}, "
            f"{steps} steps; the transformer sees timestep/1000")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header, *rows])


def run(args: argparse.Namespace) -> int:
    alphas = args.alpha or [1.0]
    try:
        configs = [TLoRAConfig(args.max_rank, args.min_rank, a) for a in alphas]
    except ValueError as e:
        raise CLIError(f"invalid --max-rank/--min-rank/--alpha: {e}") from None
    options = {"--scheduler": args.scheduler, "--resolution": args.resolution, "--shift": args.shift}
    given = [k for k, v in options.items() if v is not None]
    if args.steps is None and given:
        raise CLIError(f"{'/'.join(given)} describe the sampling steps: add --steps N")
    if args.shift is not None and args.resolution is not None:
        raise CLIError("--shift (a static shift) and --resolution (the dynamic shift's image size) exclude each other")
    scheduler, resolution = args.scheduler or "euler", args.resolution or 1024
    if scheduler == "euler" and (args.shift is not None or args.resolution is not None):
        raise CLIError("--shift/--resolution apply to --scheduler flow only")
    T = NUM_TRAIN_TIMESTEPS
    names = [f"alpha={c.alpha:g}" for c in configs]
    print(f"T-LoRA rank schedule: max_rank={args.max_rank}, min_rank={args.min_rank}, T={T}")
    t = torch.tensor(TABLE_TIMESTEPS)
    ranks = [active_rank(t, c, T).tolist() for c in configs]
    print(_table(["timestep", *names], [[str(x), *(str(r[i]) for r in ranks)] for i, x in enumerate(TABLE_TIMESTEPS)]))
    steps = None
    if args.steps is not None:
        steps = sampling_timesteps(scheduler, args.steps, resolution=resolution, shift=args.shift)
        ranks = [active_rank(steps, c, T).tolist() for c in configs]
        print()
        print(_describe(scheduler, args.steps, resolution, args.shift))
        rows = [[str(i + 1), f"{round(ts, 1):g}", *(str(r[i]) for r in ranks)] for i, ts in enumerate(steps.tolist())]
        print(_table(["step", "timestep", *names], rows))
    if args.plot:
        from ..plot import rank_schedule_figure, save_figure

        label = f"{args.steps} {scheduler} sampling steps" if steps is not None else "sampling steps"
        fig = rank_schedule_figure(configs, num_train_timesteps=T, sampling_timesteps=steps, sampling_label=label)
        print(f"\nwrote {save_figure(fig, args.plot)}")
    return 0
