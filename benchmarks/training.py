"""Cost of one training step (forward + backward): masked T-LoRA vs plain PEFT LoRA vs LyCORIS ``tlora``, ortho vs vanilla."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from tlora_diffusers import TLoRAConfig, TLoRAPatch

from .harness import interleaved, paired_ratios, summarize
from .models import add_peft, build_denoiser, lora_targets, make_inputs
from .variants import lycoris_tlora

__all__ = ["bench_training", "TARGET_MASKED_VS_PEFT"]

TARGET_MASKED_VS_PEFT = 1.03
ROWS = ("peft_lora", "tlora_vanilla", "tlora_ortho", "lycoris_tlora")


def _setup(name: str, base: nn.Module, rank: int, targets: list[str], cfg: TLoRAConfig) -> tuple[nn.Module, list, Any]:
    model = copy.deepcopy(base).train()
    keep: list = []
    before = None
    if name in ("peft_lora", "tlora_vanilla"):
        add_peft(model, rank, targets)
        if name == "tlora_vanilla":
            keep.append(TLoRAPatch(model, cfg))
    elif name == "tlora_ortho":
        from tlora_diffusers.training import add_ortho_tlora

        add_ortho_tlora(model, targets, rank, generator=torch.Generator().manual_seed(0))
        keep.append(TLoRAPatch(model, {"ortho": cfg}))
    else:
        applied = lycoris_tlora(model, rank, targets, cfg, bypass=False, svd_init=False)
        keep.append(applied)
        before = applied.before
    params = [p for n, p in model.named_parameters() if "lora" in n or n.split(".")[-1] in ("q", "p", "lam")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return model, keep, before


def bench_training(kind: str, size: str, rank: int, warmup: int, reps: int, device: torch.device,
                   dtype: torch.dtype = torch.float32, log: Callable[[str], None] = print) -> list[dict]:
    """One row per method; per-sample timesteps for ours (what training uses), LyCORIS's one global mask for it."""
    t0 = time.perf_counter()
    base = build_denoiser(kind, size, 0, device, dtype)
    targets = lora_targets(base)
    cfg = TLoRAConfig(rank, 1, 1.0)
    batch = 2
    inputs = make_inputs(kind, size, base, seed=0, batch=1 if kind == "sdxl" else batch)
    per_sample = [700.0, 200.0]
    setups = {name: _setup(name, base, rank, targets, cfg) for name in ROWS}

    def runner(name: str) -> Callable[[int], Any]:
        model, _, before = setups[name]

        def step(i: int) -> Any:
            args, kwargs = inputs.at(per_sample[0])
            if name != "lycoris_tlora":  # per-sample timesteps: each sample its own mask
                if kind == "sdxl":
                    args = (args[0], torch.tensor(per_sample, device=device))
                else:
                    kwargs = dict(kwargs, timestep=torch.tensor(per_sample, device=device) / 1000)
            elif before is not None:
                before(per_sample[0])
            out = model(*args, **kwargs)[0]
            out.float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
            return out

        return step

    times = interleaved({name: runner(name) for name in ROWS}, warmup, reps, device)
    rows = []
    for name in ROWS:
        stats = summarize(times[name].primary)
        rows.append({"model": kind, "size": size, "method": name, "rank": rank, "batch": batch,
                     "median_ms": stats["median"], "iqr_ms": stats["iqr"],
                     "x_peft_lora": paired_ratios(times[name].primary, times["peft_lora"].primary)["median"]})
    vanilla = next(r for r in rows if r["method"] == "tlora_vanilla")["x_peft_lora"]
    log(f"[training] {kind}/{size}: " + ", ".join(f"{r['method']} {r['x_peft_lora']:.3f}x" for r in rows)
        + f" (target masked vanilla <= {TARGET_MASKED_VS_PEFT}: {'met' if vanilla <= TARGET_MASKED_VS_PEFT else 'not met'};"
        f" {time.perf_counter() - t0:.0f} s)")
    return rows
