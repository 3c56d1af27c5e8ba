"""Host time per call: what the patch adds beyond unfused PEFT as the layer count grows, and the
cost of the staleness check on full-size SDXL / FLUX.1 module trees (built on the meta device)."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.models import ModelFamily, register_model_family

from .harness import default_clock, interleaved, median_us, summarize
from .models import build_denoiser, lora_targets

__all__ = ["HostNet", "bench_host", "bench_staleness"]

TARGET_HOST_US = 100.0
TARGET_CHECK_US = 50.0


class HostNet(nn.Module):
    """A denoiser whose layers cost almost nothing: what remains of a call is host work."""

    def __init__(self, layers: int, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            sample = block(sample)
        return sample


def _noop(module: nn.Module, args: tuple, output: Any) -> None:
    return None


def _variants(layers: int, rank: int, cfg: TLoRAConfig) -> dict[str, nn.Module]:
    """``peft`` (no patch), ``hook_per_layer`` (v0.1's design: a forward hook per LoRA layer that does
    nothing) and ``tlora_mask`` (this release), on the same model and LoRA."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = HostNet(layers)
    out = {}
    for name in ("peft", "hook_per_layer", "tlora_mask"):
        model = copy.deepcopy(base)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=r"blocks\.\d+",
                                           init_lora_weights=False), model)
        if name == "hook_per_layer":
            for module in model.modules():
                if hasattr(module, "lora_A"):
                    module.lora_A["default"].register_forward_hook(_noop)
        elif name == "tlora_mask":
            model.__dict__["_bench_patch"] = TLoRAPatch(model, cfg)
        out[name] = model
    return out


def bench_host(layer_counts: tuple[int, ...], rank: int, warmup: int, reps: int,
               log: Callable[[str], None] = print) -> dict:
    """Median host µs per call of ``HostNet(n)`` for each variant; overhead = patched − PEFT."""
    register_model_family(ModelFamily("bench-host", ("HostNet",)), replace=True)
    cfg = TLoRAConfig(rank, 1, 1.0)
    device = torch.device("cpu")
    x, ts = torch.randn(1, 8), torch.linspace(999, 1, 25)
    rows = []
    for n in layer_counts:
        models = _variants(n, rank, cfg)

        def runner(model: nn.Module) -> Callable[[int], Any]:
            def run(i: int) -> Any:
                with torch.no_grad():
                    return model(x, ts[i % 25])
            return run

        times = interleaved({k: runner(m) for k, m in models.items()}, warmup, reps, device, "cpu")
        med = {k: summarize(t.cpu, 1e6)["median"] for k, t in times.items()}
        rows.append({"layers": n, **{f"{k}_us": v for k, v in med.items()},
                     "overhead_us": med["tlora_mask"] - med["peft"],
                     "hook_per_layer_overhead_us": med["hook_per_layer"] - med["peft"]})
        log(f"[host] {n} layers: +{rows[-1]['overhead_us']:.1f} us/call (a hook per layer: "
            f"+{rows[-1]['hook_per_layer_overhead_us']:.1f})")
        for model in models.values():
            patch = model.__dict__.pop("_bench_patch", None)
            if patch is not None:
                patch.remove()
    first, last = rows[0], rows[-1]
    slope = (last["overhead_us"] - first["overhead_us"]) / max(last["layers"] - first["layers"], 1)
    at_700 = next((r["overhead_us"] for r in rows if r["layers"] == 700), None)
    return {"method": "median thread CPU time per call of HostNet (Linear(8, 8) layers on a (1, 8) input, so "
                      "the time is host work), interleaved; overhead = with TLoRAPatch - the same PEFT LoRA without",
            "rows": rows, "per_layer_us": slope, "overhead_at_700_us": at_700, "target_us": TARGET_HOST_US,
            "met": at_700 is not None and at_700 <= TARGET_HOST_US}


def bench_staleness(rank: int = 64, n: int = 200, log: Callable[[str], None] = print) -> list[dict]:
    """``TLoRAPatch.check()`` (run at every pipeline call and bare denoiser call) on full-size module trees."""
    rows = []
    for kind in ("sdxl", "flux"):
        model = build_denoiser(kind, "full", 0, torch.device("meta"), torch.float32)
        targets = lora_targets(model)
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
        patch = TLoRAPatch(model, TLoRAConfig(rank, 1, 1.0))
        us = median_us(patch.check, n, "cpu")
        modules = sum(1 for _ in model.modules())
        rows.append({"model": kind, "size": "full", "modules": modules, "adapted_layers": len(patch.layer_names),
                     "check_us": us, "target_us": TARGET_CHECK_US, "met": us <= TARGET_CHECK_US})
        log(f"[staleness] {kind} full ({modules} modules, {len(patch.layer_names)} LoRA layers): check {us:.1f} us")
        patch.remove()
    return rows
