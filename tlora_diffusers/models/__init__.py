"""Per-model adapters: how each denoiser class receives its timestep.

Each adapter converts its model's own timestep argument into scheduler units once,
at the boundary (as k-diffusion's ``external.py`` does); masks never see a model's
convention. Adapters are looked up along the denoiser class's MRO, so subclasses of
a registered class work too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["ModelAdapter", "register_model_adapter", "get_model_adapter", "supported_models"]


@dataclass(frozen=True)
class ModelAdapter:
    """How a denoiser's ``forward`` receives its timestep.

    Args:
        timestep_arg: name of the timestep parameter of ``forward``.
        scale: factor that turns the model's timestep into scheduler units
            (1000 for Flux/Flux2, whose pipelines pass ``t / 1000``).
    """

    timestep_arg: str = "timestep"
    scale: float = 1.0
    _positions: dict = field(default_factory=dict, repr=False, compare=False)

    def timestep(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """This call's timestep in scheduler units."""
        t = kwargs.get(self.timestep_arg)
        if t is None:
            position = self._position(type(module))
            if position is not None and position < len(args):
                t = args[position]
        if t is None:
            raise ValueError(
                f"{type(module).__name__}.forward was called without `{self.timestep_arg}`: "
                "a T-LoRA needs the timestep of every denoiser call"
            )
        return t if self.scale == 1.0 else _unscale(t, self.scale)

    def _position(self, cls: type) -> int | None:
        if cls not in self._positions:
            names = [
                p.name
                for p in inspect.signature(cls.forward).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            self._positions[cls] = names.index(self.timestep_arg) - 1 if self.timestep_arg in names else None
        return self._positions[cls]


def _unscale(t: Any, scale: float) -> Any:
    """Undo a pipeline's ``t / scale``, recovering integer timesteps exactly.

    ``fl(t / 1000) * 1000`` misses an integer ``t`` by an ulp in about 1% of cases, which
    flips ``floor`` where the schedule lands on a whole rank. An integer whose division
    rounds to the same value is indistinguishable from the pipeline's own ``t``, so it
    is taken; other values are rounded back to the timestep's dtype.
    """
    if not isinstance(t, torch.Tensor):
        candidate = round(t * scale)
        return candidate if candidate / scale == t else t * scale
    if not t.is_floating_point():
        return t * scale
    wide = t.to(torch.float32 if t.device.type == "mps" else torch.float64) * scale  # MPS has no float64
    candidate = torch.round(wide)
    exact = (candidate / scale).to(t.dtype) == t
    return torch.where(exact, candidate, wide.to(t.dtype).to(wide.dtype))


_REGISTRY: dict[type, ModelAdapter] = {}


def register_model_adapter(model_cls: type, adapter: ModelAdapter) -> None:
    """Teach TLoRAPatch a new denoiser class.

    Example:
        >>> from diffusers import SanaTransformer2DModel
        >>> register_model_adapter(SanaTransformer2DModel, ModelAdapter(scale=1.0))
    """
    if not isinstance(model_cls, type) or not issubclass(model_cls, nn.Module):
        raise TypeError(f"model_cls must be an nn.Module subclass, got {model_cls!r}")
    if not isinstance(adapter, ModelAdapter):
        raise TypeError(f"adapter must be a ModelAdapter, got {type(adapter).__name__}")
    _REGISTRY[model_cls] = adapter


def supported_models() -> list[str]:
    """Names of the denoiser classes with a registered adapter."""
    return sorted(cls.__name__ for cls in _REGISTRY)


def get_model_adapter(module: nn.Module) -> ModelAdapter:
    """The adapter for ``module``'s class (or its nearest registered base class)."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    raise TypeError(
        f"no T-LoRA model adapter for {type(module).__name__}; supported: {', '.join(supported_models())}. "
        "Register one with tlora_diffusers.register_model_adapter("
        f"{type(module).__name__}, ModelAdapter(timestep_arg='timestep', scale=...)), where scale "
        "turns the timestep the pipeline passes into scheduler units"
    )


def _register_builtin(names_and_adapters: list[tuple[Callable[[], type], ModelAdapter]]) -> None:
    for load, adapter in names_and_adapters:
        try:
            cls = load()
        except (ImportError, AttributeError):  # an older diffusers without this model
            continue
        register_model_adapter(cls, adapter)


from . import flux, sd3, unet  # noqa: E402,F401  (register the built-in adapters)
