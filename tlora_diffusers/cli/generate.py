"""`tlora-diffusers generate`: images from a local pipeline and a T-LoRA file, settings in the PNGs.

Many prompts (``--prompts FILE``) are split across processes under ``accelerate launch``
with ``PartialState().split_between_processes``; every process writes into the same
folder. Names come from the prompt's index in the file and the seed, and each file is
created with ``O_EXCL``, so no process and no earlier run is ever overwritten.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import __version__
from ._help import HelpFormatter
from ._common import (
    DTYPES,
    CLIError,
    add_schedule_overrides,
    add_threads,
    load_lora,
    load_pipeline,
    lora_source,
    model_dir,
    non_negative_int,
    positive_int,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
    use_threads,
    writable_dir,
)

__all__ = ["add_parser", "run", "PromptJob", "read_prompts", "my_share", "write_pngs"]

EPILOG = """\
examples:
  tlora-diffusers generate --model scenes --lora scenes-example --prompt "a sks shape on a blue background" \\
      --also-unmasked --grid                     # runs as written: the shipped scenes model and its T-LoRA
  tlora-diffusers generate --model ./sdxl --lora out/ --prompt "a photo of a sks dog" --seed 1 --num-images 4
  tlora-diffusers generate --model ./sdxl --lora hf://me/sks-dog-tlora --prompt "a sks dog"
  tlora-diffusers generate --model ./sdxl --lora plain_lora.safetensors --min-rank 32 --alpha 1 \\
      --prompt "a sks dog"                       # a file without a schedule: give it (rank from the file)
  tlora-diffusers generate --model ./sdxl --lora lycoris.safetensors --lycoris-config lycoris_config.json \\
      --prompt "a sks dog"                       # a SimpleTuner file without its header
  accelerate launch -m tlora_diffusers.cli generate --model ./sdxl --lora out/ --prompts prompts.jsonl

--prompts FILE: one prompt per line, or one JSON object per line such as
  {"prompt": "a sks dog on a beach", "seed": 7, "negative_prompt": "blurry"}
(blank lines and lines starting with # are skipped). Files are named INDEX-seedSEED.png
(INDEX: the prompt's position in the file), -unmasked.png for --no-mask, INDEX-grid.png for
--grid; an existing name gets -1, -2, ... and is never overwritten. The settings are in each
PNG's text chunks (prompt, seed, steps, guidance, tlora_config, lora, model, ...).
"""


def add_parser(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "generate", parents=parents, epilog=EPILOG, formatter_class=HelpFormatter,
        help="generate images with a T-LoRA on a local diffusers pipeline",
        description="Load a local diffusers pipeline and a T-LoRA file, generate with the rank mask, and\n"
        "save PNGs with their settings embedded.",
    )
    p.add_argument("--model", required=True, metavar="PATH",
                   help="local diffusers pipeline folder; `scenes` is the shipped scenes model")
    p.add_argument("--lora", required=True, metavar="FILE",
                   help="T-LoRA file or a folder holding one; hf://user/repo[/file] for a Hub file; `scenes-example` "
                        "is the T-LoRA shipped with the scenes model")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the prompt")
    prompts.add_argument("--prompts", metavar="FILE", help="many prompts: text or JSONL, one per line")
    p.add_argument("--negative-prompt", metavar="TEXT", help="negative prompt, for pipelines with CFG (default: none)")
    p.add_argument("--steps", type=positive_int, default=25, metavar="N", help="sampling steps (default: 25)")
    p.add_argument("--guidance", type=float, metavar="G", help="guidance scale (default: the pipeline's)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the first image; image i of a prompt uses seed + i (default: 0)")
    p.add_argument("--width", type=positive_int, metavar="PX", help="default: the pipeline's")
    p.add_argument("--height", type=positive_int, metavar="PX", help="default: the pipeline's")
    p.add_argument("--num-images", type=positive_int, default=1, metavar="N", help="images per prompt (default: 1)")
    p.add_argument("--out", default="tlora-images", metavar="DIR", help="output folder (default: tlora-images)")
    p.add_argument("--device", default="auto", help="auto (accelerate's / best available), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: float32 on CPU, bfloat16 (or float16) on GPU")
    p.add_argument("--also-unmasked", "--no-mask", dest="no_mask", action="store_true",
                   help="also render each image without the mask (all ranks at every step), beside the masked one, "
                        "for comparison (--no-mask is the old name)")
    p.add_argument("--grid", action="store_true", help="also write one labelled grid per prompt")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no file list")
    add_threads(p)
    add_schedule_overrides(p, "schedule", "the T-LoRA config: replaces fields of the file's for this run, or gives it "
                           "for a file without one")
    p.set_defaults(run=run)


# -- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptJob:
    """One prompt to render: ``index`` (its place in the prompt list) names its files."""

    index: int
    prompt: str
    seed: int
    negative_prompt: Optional[str] = None


_JSON_KEYS = ("prompt", "seed", "negative_prompt")


def _json_job(line: str, where: str, index: int, seed: int, negative: Optional[str]) -> PromptJob:
    try:
        data = json.loads(line)
    except ValueError as e:
        raise CLIError(f"{where}: not valid JSON ({e}); write one prompt per line, or one object per line like "
                       '{"prompt": "a sks dog", "seed": 1}') from None
    if not isinstance(data, dict):
        raise CLIError(f"{where}: expected a JSON object with a 'prompt', got {type(data).__name__}")
    unknown = sorted(set(data) - set(_JSON_KEYS))
    if unknown:
        raise CLIError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(_JSON_KEYS)}")
    prompt, seed, negative = data.get("prompt"), data.get("seed", seed), data.get("negative_prompt", negative)
    if not isinstance(prompt, str) or not prompt.strip():
        raise CLIError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CLIError(f"{where}: 'seed' must be a whole number >= 0, got {seed!r}")
    if negative is not None and not isinstance(negative, str):
        raise CLIError(f"{where}: 'negative_prompt' must be a string, got {negative!r}")
    return PromptJob(index, prompt, seed, negative)


def read_prompts(path: str, seed: int = 0, negative_prompt: Optional[str] = None) -> list[PromptJob]:
    """Prompts of a text file (one per line) or JSONL (``{"prompt", "seed", "negative_prompt"}``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"--prompts {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise CLIError(f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    jobs = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):  # a JSON array is not a prompt: refuse it instead of drawing its text
            raise CLIError(f"--prompts {path}:{lineno}: a JSON array; write one prompt per line, or one JSON object "
                           'per line like {"prompt": "a sks dog", "seed": 1}')
        if line.startswith("{"):
            jobs.append(_json_job(line, f"--prompts {path}:{lineno}", len(jobs), seed, negative_prompt))
        else:
            jobs.append(PromptJob(len(jobs), line, seed, negative_prompt))
    if not jobs:
        raise CLIError(f"--prompts {path}: no prompts in the file (one per line; # starts a comment)")
    return jobs


def my_share(jobs: list[PromptJob], state: Any) -> list[PromptJob]:
    """This process's part of ``jobs`` (accelerate's contiguous split; all of them for one process)."""
    with state.split_between_processes(jobs) as mine:
        return list(mine)


# -- files ------------------------------------------------------------------------------------


def _png_info(settings: dict[str, Any]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))
    return info


def write_pngs(out: Path, stem: str, items: Sequence[tuple[str, Any, dict[str, Any]]]) -> list[Path]:
    """Write ``(suffix, image, settings)`` as ``stem[-n]suffix.png``, all with the same free ``n``.

    Each name is claimed with ``O_CREAT | O_EXCL``: a name another process or an earlier
    run holds is never opened, and the next ``n`` is tried for the whole set.
    """
    for n in range(10_000):
        tag = f"-{n}" if n else ""
        claimed: list[tuple[Path, int]] = []
        try:
            for suffix, _, _ in items:
                path = out / f"{stem}{tag}{suffix}.png"
                claimed.append((path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)))
        except FileExistsError:
            for path, fd in claimed:
                os.close(fd)
                path.unlink()
            continue
        try:
            for (path, fd), (_, image, settings) in zip(claimed, items):
                with os.fdopen(fd, "wb") as f:
                    image.save(f, format="PNG", pnginfo=_png_info(settings))
        except BaseException:
            for path, _ in claimed:
                path.unlink(missing_ok=True)
            raise
        return [path for path, _ in claimed]
    raise CLIError(f"--out {out}: no free name for {stem}*.png after 10000 tries; use another --out")


# -- running ----------------------------------------------------------------------------------


def _distributed_state(device: str) -> Any:
    """accelerate's state of this process; CPU processes need ``cpu=True`` to form a group."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and state.num_processes != world:
        raise CLIError(
            f"launched as {world} processes, but accelerate formed no process group (no GPU?), so each would "
            "render every prompt; pass --device cpu (or accelerate launch --cpu) for CPU processes"
        )
    return state


def _call_parameters(pipe: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipe).__call__).parameters)


def _check_options(pipe: Any, params: dict, jobs: list[PromptJob], args: argparse.Namespace) -> None:
    wanted = {"guidance_scale": ("--guidance", args.guidance), "width": ("--width", args.width),
              "height": ("--height", args.height),
              "negative_prompt": ("--negative-prompt", any(j.negative_prompt for j in jobs) or None)}
    for name, (flag, value) in wanted.items():
        if value is not None and name not in params:
            raise CLIError(f"{flag}: {type(pipe).__name__} takes no {name}; leave {flag} out for this model")


def _note_resolution(pipe: Any, args: argparse.Namespace, tag: str) -> None:
    """Say when the asked size is not the model's own (the pipeline's default when none is given)."""
    from ..training.data import model_resolution

    if args.width is None and args.height is None:
        return
    try:
        native = model_resolution(pipe)
    except ValueError:
        return
    width, height = args.width or native, args.height or native
    if (width, height) != (native, native) and not args.quiet:
        print(f"{tag}note: {width}x{height} differs from the model's resolution {native}x{native}", flush=True)


def _pipe_kwargs(params: dict, job: PromptJob, seeds: list[int], args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompt": job.prompt, "num_inference_steps": args.steps, "num_images_per_prompt": len(seeds),
        # CPU generators: the same seed gives the same image on every device.
        "generator": [torch.Generator().manual_seed(s) for s in seeds],
    }
    optional = {"negative_prompt": job.negative_prompt, "guidance_scale": args.guidance,
                "width": args.width, "height": args.height}
    kwargs.update({k: v for k, v in optional.items() if v is not None and k in params})
    return kwargs


def _save(out: Path, job: PromptJob, seeds: list[int], masked: list, unmasked: Optional[list],
          common: dict[str, Any], grid: bool) -> list[Path]:
    """One prompt's PNGs (masked, unmasked if rendered, and the grid if asked), settings embedded."""
    paths = []
    for i, seed in enumerate(seeds):
        settings = {"prompt": job.prompt, "negative_prompt": job.negative_prompt or "", "seed": seed,
                    "width": masked[i].width, "height": masked[i].height, **common}
        items = [("", masked[i], {**settings, "masked": True})]
        if unmasked is not None:
            items.append(("-unmasked", unmasked[i], {**settings, "masked": False}))
        paths += write_pngs(out, f"{job.index:05d}-seed{seed}", items)
    if grid:
        from ..plot import image_grid

        labels = [f"seed {s}, T-LoRA" for s in seeds] + [f"seed {s}, unmasked" for s in seeds] * bool(unmasked)
        image = image_grid(masked + (unmasked or []), labels, cols=len(seeds))
        settings = {"prompt": job.prompt, "seeds": seeds, **common}
        paths += write_pngs(out, f"{job.index:05d}-grid", [("", image, settings)])
    return paths


def run(args: argparse.Namespace, state: Any = None) -> int:
    """Generate every job of this process; ``state`` stands in for accelerate's ``PartialState``."""
    from tqdm.auto import tqdm

    from ..patch import TLoRAPatch

    if args.prompts is not None:
        jobs = read_prompts(args.prompts, args.seed, args.negative_prompt)
    elif not args.prompt.strip():
        raise CLIError("--prompt is empty; pass the text to generate")
    else:
        jobs = [PromptJob(0, args.prompt, args.seed, args.negative_prompt)]
    lora_source(args.lora)  # checked before the pipeline loads: a mistyped path fails at once
    model_dir(args.model)
    out = writable_dir(args.out)
    use_threads(args)
    state = state if state is not None else _distributed_state(args.device)
    distributed = state.num_processes > 1
    tag = f"[{state.process_index}/{state.num_processes}] " if distributed else ""

    device = resolve_device(args.device, state.device if distributed else None)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, device, dtype, args.verbose)
    params = _call_parameters(pipe)
    _check_options(pipe, params, jobs, args)
    _note_resolution(pipe, args, tag)
    with quiet_libraries(args.verbose):
        loaded = load_lora(pipe, args.lora, args)
    lora_format = loaded.format
    mine = my_share(jobs, state)
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False, desc=f"{tag}sampling")
    default_guidance = params["guidance_scale"].default if "guidance_scale" in params else None
    common = {
        "steps": args.steps, "guidance": args.guidance if args.guidance is not None else default_guidance,
        "tlora_config": loaded.config.to_dict(), "lora": str(loaded.path), "lora_format": lora_format,
        "model": str(args.model), "pipeline": type(pipe).__name__, "dtype": str(dtype).replace("torch.", ""),
        "software": f"tlora_diffusers {__version__}",
    }
    written: list[Path] = []
    for job in tqdm(mine, desc=f"{tag}prompts", disable=args.quiet or len(mine) < 2):
        seeds = [job.seed + i for i in range(args.num_images)]
        with TLoRAPatch(pipe, adapter_names=[loaded.adapter_name]):
            masked = pipe(**_pipe_kwargs(params, job, seeds, args)).images
        unmasked = pipe(**_pipe_kwargs(params, job, seeds, args)).images if args.no_mask else None
        paths = _save(out, job, seeds, masked, unmasked, common, grid=args.grid)
        written += paths
        if not args.quiet:
            for path in paths:
                tqdm.write(str(path))
    if not args.quiet:
        print(f"{tag}wrote {len(written)} file(s) to {out} ({len(mine)} of {len(jobs)} prompt(s))", flush=True)
    return 0
