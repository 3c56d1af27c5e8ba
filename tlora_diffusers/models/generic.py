"""Any denoiser, with or without a family file: its timestep argument and what is declared about it.

A denoiser class that no :class:`~tlora_diffusers.models.ModelFamily` names still works on
a stock pipeline: its timestep parameter is read off ``forward``'s signature and its
convention is inferred from the pipeline's loop (:mod:`tlora_diffusers.runtime.timesteps`).
A family file adds what cannot be inferred: default LoRA targets, token layers for
per-token timesteps, training recipes, the argument where the signature is ambiguous, and a
declared convention (verified all the same).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.nn as nn

from .conventions import Convention

__all__ = ["Denoiser", "describe", "timestep_parameter", "is_text_model", "pipeline_denoisers", "PIPELINE_ORDER"]

#: Parameter names taken as the diffusion timestep, in order; the first present wins.
TIMESTEP_NAMES = ("timestep", "timesteps", "t")
#: Pipeline attributes in the order they are patched and listed.
PIPELINE_ORDER = ("unet", "transformer", "transformer_2", "unconditional_transformer", "controlnet", "prior", "decoder")

_POSITIONS: dict[type, Optional[int]] = {}
_LOCK = threading.Lock()


def _parameters(cls: type) -> list[str]:
    try:
        return [p for p in inspect.signature(cls.forward).parameters if p != "self"]
    except (TypeError, ValueError):
        return []


def timestep_parameter(cls: type) -> Optional[str]:
    """The ``forward`` parameter that takes the diffusion timestep, or ``None`` if none or ambiguous.

    ``timestep``, ``timesteps`` or ``t`` (in that order) when present; else the one parameter
    whose name contains ``timestep``.
    """
    params = _parameters(cls)
    for name in TIMESTEP_NAMES:
        if name in params:
            return name
    timeish = [p for p in params if "timestep" in p]
    return timeish[0] if len(timeish) == 1 else None


def is_text_model(module: nn.Module) -> bool:
    """Text and image encoders (transformers, open_clip): LoRAs there are not timestep-dependent."""
    return type(module).__module__.startswith(("transformers.", "open_clip"))


@dataclass(frozen=True)
class Denoiser:
    """What the patch needs to know about one denoiser class.

    ``name``: the family's name, or the class name when no family file names it;
    ``convention``: declared by the family, ``None`` when inferred from the loop.
    """

    name: str
    cls: type
    timestep_arg: str
    convention: Optional[Convention]
    token_layers: Optional[Callable[[str], bool]] = None
    video: bool = False
    family: Any = None
    frame_tokens: bool = False
    layer_timesteps: Any = None
    call_timestep: Any = None

    def raw_timestep(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The timestep argument of this ``forward`` call, as the pipeline passed it."""
        t = kwargs.get(self.timestep_arg)
        if t is None:
            position = _position(type(module), self.timestep_arg)
            if position is not None and position < len(args):
                t = args[position]
        if t is None:
            raise ValueError(
                f"{type(module).__name__}.forward was called without `{self.timestep_arg}` ({self.name}): a T-LoRA "
                "needs the timestep of every denoiser call"
            )
        return t


def _position(cls: type, arg: str) -> Optional[int]:
    with _LOCK:
        key = (cls, arg)
        if key not in _POSITIONS:
            params = [p.name for p in inspect.signature(cls.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            _POSITIONS[key] = params.index(arg) - 1 if arg in params else None
        return _POSITIONS[key]


def describe(module: nn.Module, *, need_declared: bool = False) -> Denoiser:
    """The :class:`Denoiser` of ``module``: its family's, or inferred from its signature.

    ``need_declared``: a bare denoiser (no pipeline loop to infer from) needs a family.
    """
    from . import find_family, supported_models
    from .support import refusal_of

    cls = type(module)
    refusal = refusal_of(cls)
    if refusal:
        raise TypeError(f"a T-LoRA cannot be masked on {refusal}")
    family = find_family(module)
    if family is not None:
        arg = family.timestep_arg
        if arg not in _parameters(cls):
            raise ValueError(
                f"{cls.__name__}.forward has no parameter {arg!r} (model family {family.name!r}); its parameters are "
                f"{_parameters(cls)}. Register a family whose timestep_arg names the timestep parameter"
            )
        return Denoiser(family.name, cls, arg, family.convention, family.token_layers, family.video, family,
                        family.frame_tokens, family.layer_timesteps or None, family.call_timestep)
    arg = timestep_parameter(cls)
    if need_declared or arg is None:
        guess = arg or next((p for p in _parameters(cls) if "time" in p), "timestep")
        why = ("a bare denoiser has no pipeline loop to infer its timestep convention from"
               if arg is not None else f"its forward parameters {_parameters(cls)} name no single timestep")
        raise TypeError(
            f"no T-LoRA model family knows {cls.__name__} and {why}. Supported families: "
            f"{', '.join(supported_models())}. Describe it with tlora_diffusers.models.register_model_family("
            f"ModelFamily(name=..., denoisers=({cls.__name__!r},), timestep_arg={guess!r}, convention=conventions.<what "
            "the pipeline passes: SCHEDULER_UNITS, FRACTION (t / 1000), REVERSED_FRACTION, ...>)); pipeline runs "
            "check the convention against the pipeline's own timesteps"
        )
    return Denoiser(cls.__name__, cls, arg, None)


def pipeline_denoisers(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's denoisers: components with a family or a timestep parameter (``torch.compile``
    wrappers unwrapped; text encoders never), unet/transformer first."""
    from ..runtime.clock import components_of
    from . import find_family
    from .support import refusal_of

    found = {}
    for name, value in components_of(pipe).items():
        if not isinstance(value, nn.Module) or name.startswith("_"):
            continue
        module = getattr(value, "_orig_mod", value)
        if is_text_model(module):
            continue
        if find_family(module) is not None or timestep_parameter(type(module)) is not None or refusal_of(type(module)):
            found[name] = module  # a refused class too: patching it raises its reason
    order = {a: i for i, a in enumerate(PIPELINE_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
