"""What runs in each benchmark row: the same denoiser and LoRA, adapted by each method."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from tlora_diffusers import TLoRAConfig, TLoRAPatch

from .models import add_peft

__all__ = ["Applied", "VARIANTS", "apply_variant", "lycoris_tlora"]

#: base, PEFT LoRA unfused / fused, our mask path, LyCORIS tlora (default and bypass modes).
VARIANTS = ("base", "peft_unfused", "peft_fused", "tlora_mask", "lycoris_default", "lycoris_bypass")


@dataclass
class Applied:
    """A variant ready to call: ``before(t)``/``after()`` run around each call (LyCORIS's global mask)."""

    model: nn.Module
    layers: int = 0
    before: Optional[Callable[[float], None]] = None
    after: Optional[Callable[[], None]] = None
    keep: list = field(default_factory=list)  # objects that must live as long as the model (patch, network)

    def call(self, args: tuple, kwargs: dict, t: float) -> Any:
        if self.before:
            self.before(t)
        try:
            return self.model(*args, **kwargs)
        finally:
            if self.after:
                self.after()


def apply_variant(name: str, base: nn.Module, rank: int, targets: list[str], cfg: TLoRAConfig,
                  lycoris_svd_init: bool = False) -> Applied:
    """A deep copy of ``base`` adapted by variant ``name`` (same LoRA seed for every variant)."""
    model = copy.deepcopy(base)
    if name == "base":
        return Applied(model)
    if name.startswith("lycoris"):
        return lycoris_tlora(model, rank, targets, cfg, bypass=name == "lycoris_bypass", svd_init=lycoris_svd_init)
    layers = add_peft(model, rank, targets)
    if name == "peft_unfused":
        return Applied(model, layers)
    if name == "peft_fused":
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        return Applied(model, layers)
    if name == "tlora_mask":
        patch = TLoRAPatch(model, cfg)
        return Applied(model, layers, keep=[patch])
    raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")


@contextlib.contextmanager
def _lycoris_fast_init(enabled: bool):
    """Random factors instead of LyCORIS tlora's SVD initialisation (seconds per 3072-wide layer on a CPU
    thread, and it changes only the values a forward computes, not its cost)."""
    if enabled:
        yield
        return
    from lycoris.modules.tlora import TLoraModule

    original = TLoraModule._initialize_from_svd

    def random_init(self, org_module, in_dim, out_dim, flat_in_dim):
        if self.isconv:
            return original(self, org_module, in_dim, out_dim, flat_in_dim)
        r = self.lora_dim
        self.q_layer.weight.data = torch.randn(r, in_dim) / math.sqrt(in_dim)
        self.p_layer.weight.data = torch.randn(out_dim, r) / math.sqrt(r)
        self.lambda_layer.data = torch.linspace(1.0, 0.1, r).unsqueeze(0)

    TLoraModule._initialize_from_svd = random_init
    try:
        yield
    finally:
        TLoraModule._initialize_from_svd = original


def lycoris_tlora(model: nn.Module, rank: int, targets: list[str], cfg: TLoRAConfig, bypass: bool,
             svd_init: bool) -> Applied:
    """LyCORIS ``tlora`` on the same layers, masked per call SimpleTuner-style (a global CPU mask)."""
    import lycoris
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    param = next(model.parameters())
    names = "|".join(t.replace(".", r"\.") for t in targets)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(f"target_module = []\ntarget_name = ['(?:{names})$']\nuse_fnmatch = false\n")
    try:
        with _lycoris_fast_init(svd_init):
            net = lycoris.create_lycoris(model, 1.0, linear_dim=rank, linear_alpha=rank, algo="tlora",
                                         preset=f.name, bypass_mode=bypass)
    finally:
        os.unlink(f.name)
    net.apply_to()
    net.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        for lora in net.loras:  # move off the initial state so the delta is not exactly zero
            lora.lambda_layer.mul_(1.01)

    def before(t: float) -> None:
        set_timestep_mask(compute_timestep_mask(int(t), 1000, cfg.max_rank, cfg.min_rank, cfg.alpha))

    return Applied(model, len(net.loras), before=before, after=clear_timestep_mask, keep=[net])
