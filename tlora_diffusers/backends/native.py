"""Native orthogonal T-LoRA layers (for training): ``y = W x + s·[P((Qx)·λ·m) − P₀((Q₀x)·λ₀·m)]``.

PEFT has no layer with a frozen base branch, so ortho training uses this small wrapper,
which keeps ``base_layer`` like PEFT does and declares its adapter tensors as class
tuples. Linear and Conv2d of any kernel size (LyCORIS crashes on k > 1). The rank
bottleneck has shape (…, 2, R) (conv: (B, 2, R, H, W)): trainable and frozen branches
share one mask entry per rank, read from the denoiser's slot in ``OUTPUTS`` mode (these
layers are for training). Saved files use the exact paired PEFT encoding
(:func:`tlora_diffusers.ortho.paired_lora_factors`).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TLoRAConfig
from ..ortho import paired_lora_factors
from ..runtime.layer import LAYER_ATTR, LayerMask
from ..runtime.slot import OUTPUTS, mask_output
from . import MaskSite

__all__ = ["OrthoTLoRALayer", "NativeBackend"]


class OrthoTLoRALayer(nn.Module):
    """Ortho T-LoRA around a Linear or Conv2d; zero delta at init (P, Q, λ equal their frozen copies)."""

    adapter_param_names = ("q", "p", "lam")
    adapter_buffer_names = ("q0", "p0", "lam0")

    def __init__(self, base_layer: nn.Module, p: torch.Tensor, lam: torch.Tensor, q: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
            raise ValueError(f"ortho T-LoRA needs groups=1 convolutions, got groups={base_layer.groups}")
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"ortho T-LoRA wraps Linear or Conv2d layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.rank = lam.numel()
        self.scale = float(scale)
        dtype = torch.float32
        self.q = nn.Parameter(q.to(dtype).clone())
        self.p = nn.Parameter(p.to(dtype).clone())
        self.lam = nn.Parameter(lam.reshape(-1).to(dtype).clone())
        self.register_buffer("q0", q.to(dtype).clone())
        self.register_buffer("p0", p.to(dtype).clone())
        self.register_buffer("lam0", lam.reshape(-1).to(dtype).clone())
        self.to(base_layer.weight.device)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        # The two branches run the same ops separately, so at init (P, Q, λ equal to their
        # frozen copies) they are bitwise equal and the delta is exactly zero.
        if self.is_conv:
            conv = self.base_layer
            shape = (self.rank, conv.in_channels, *conv.kernel_size)

            def down(w):
                return F.conv2d(x, w.to(x.dtype).reshape(shape), None, conv.stride, conv.padding, conv.dilation)

            def up(h, lam, w):
                return F.conv2d(h * lam.to(x.dtype)[:, None, None], w.to(x.dtype)[:, :, None, None])

            h = self._gate(torch.stack([down(self.q), down(self.q0)], dim=1))  # (B, 2, R, H, W)
            h, h0 = h[:, 0], h[:, 1]
        else:

            def up(h, lam, w):
                return F.linear(h * lam.to(x.dtype), w.to(x.dtype))

            h = self._gate(torch.stack([F.linear(x, self.q.to(x.dtype)), F.linear(x, self.q0.to(x.dtype))], -2))
            h, h0 = h[..., 0, :], h[..., 1, :]
        return result + (up(h, self.lam, self.p) - up(h0, self.lam0, self.p0)) * self.scale

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        """The rank bottleneck: masked by the current call when a patch is attached."""
        state = self.__dict__.get(LAYER_ATTR)
        if state is None or state.slot.mode is not OUTPUTS:
            return h
        return mask_output(self, h)

    def orthogonality_penalty(self) -> torch.Tensor:
        """``‖PᵀP − I‖² + ‖QQᵀ − I‖²`` (paper Sec. 3.2); zero at an SVD init."""
        eye = torch.eye(self.rank, device=self.p.device, dtype=self.p.dtype)
        return ((self.p.T @ self.p - eye) ** 2).sum() + ((self.q @ self.q.T - eye) ** 2).sum()

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT ``(lora_A, lora_B)`` weights of the exact paired encoding (rank 2R, scaling 1)."""
        a, b = paired_lora_factors(self.p, self.lam, self.q, self.p0, self.lam0, self.q0, self.scale)
        if self.is_conv:
            conv = self.base_layer
            a = a.reshape(2 * self.rank, conv.in_channels, *conv.kernel_size)
            b = b[:, :, None, None]
        return a, b


class NativeBackend:
    name = "native"

    def active_adapters(self, denoiser: nn.Module) -> list[str]:
        return ["ortho"] if any(isinstance(m, OrthoTLoRALayer) for m in denoiser.modules()) else []

    loaded_adapters = active_adapters

    def mask_sites(self, denoiser: nn.Module, adapters: Sequence[str]) -> list[MaskSite]:
        if "ortho" not in adapters:
            return []
        return [
            MaskSite(f"{name} (adapter 'ortho')", "ortho", layer, 2 if layer.is_conv else -1, layer.rank,
                     _always_valid, path=name, groupable=False, backend=self.name)
            for name, layer in denoiser.named_modules()
            if isinstance(layer, OrthoTLoRALayer)
        ]

    def running_adapters(self, site: MaskSite) -> list[str]:
        return [site.adapter]

    def check_schedules(self, sites: Sequence[MaskSite], configs: Mapping[str, TLoRAConfig], where: str) -> None:
        return None

    def install(self, site: MaskSite, slot, tokenwise: bool) -> None:
        site.module.__dict__[LAYER_ATTR] = LayerMask(slot, site.adapter, site.rank_dim, tokenwise, site.name)

    def uninstall(self, site: MaskSite) -> None:
        site.module.__dict__.pop(LAYER_ATTR, None)


def _always_valid() -> Optional[str]:
    return None
