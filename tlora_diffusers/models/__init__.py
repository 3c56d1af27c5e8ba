"""Model families: one file per family says everything tlora_diffusers needs to know about it.

A :class:`ModelFamily` names the denoiser classes (by name, looked up lazily, so nothing
here imports diffusers and an older diffusers without a class is fine), the timestep
argument of their ``forward``, the :mod:`~tlora_diffusers.models.conventions` that turns
what the pipeline passes into scheduler units, the pipeline attributes that hold them,
the default LoRA targets, the layers whose rows are tokens (for per-token timesteps)
and, where the family trains, its training recipes. Adding a family is one module here
(plus its tests) and :func:`register_model_family`.

Example:
    >>> from tlora_diffusers.models import ModelFamily, register_model_family, conventions
    >>> register_model_family(ModelFamily(
    ...     name="my-dit", denoisers=("MyDiTModel",), convention=conventions.FRACTION))
"""

from __future__ import annotations

import importlib
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch.nn as nn

from . import conventions
from .conventions import SCHEDULER_UNITS, Convention

__all__ = [
    "ModelFamily", "register_model_family", "family_of", "find_family", "model_families", "supported_models",
    "BUILTIN_FAMILIES", "token_layer_rule", "conventions", "pipeline_denoisers", "describe", "Denoiser",
    "timestep_parameter",
]

#: Modules of this package that are not a family (every other module defines one ``FAMILY``).
_NOT_FAMILIES = ("conventions", "docs", "generic", "support")


def _builtin_family_modules() -> tuple[str, ...]:
    """Every family module of this package: adding a family is adding its file (none of them imports diffusers)."""
    import pkgutil

    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if not m.name.startswith("_") and m.name not in _NOT_FAMILIES))


BUILTIN_FAMILIES = _builtin_family_modules()


def token_layer_rule(*patterns: str) -> Callable[[str], bool]:
    """A ``token_layers`` predicate: module paths matching any regex (``re.search``) carry token rows."""
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(p.search(path) for p in compiled)


@dataclass(frozen=True)
class ModelFamily:
    """Everything tlora_diffusers knows about one family of denoisers.

    Args:
        name: short name, e.g. ``"flux"`` (registry key).
        denoisers: class names of the family's denoisers (``"FluxTransformer2DModel"``);
            subclasses match too. Looked up by name, so the classes are never imported here.
        timestep_arg: name of the ``forward`` parameter that receives the timestep
            (positional or keyword; HiDream's is ``"timesteps"``, Z-Image's ``"t"``).
        convention: turns what the pipeline passes into scheduler units
            (:mod:`tlora_diffusers.models.conventions`); ``None`` infers it from the
            pipeline's loop at run time (every declared one is verified there too).
        pipeline_attrs: pipeline attributes that may hold this family's denoisers
            (Wan 2.2: ``("transformer", "transformer_2")``).
        pipelines: names of the stock pipelines of the family (documentation and tests).
        default_targets: PEFT ``target_modules`` the trainer uses by default.
        token_layers: for families whose pipelines pass one timestep per token
            (``(B, seq)``): ``path -> bool``, true for layers whose rows are those tokens.
            Other layers use each sample's largest timestep.
        video: the denoiser works on temporally compressed video latents (masks there are
            experimental; patching logs one warning).
        frame_tokens: per-token timesteps may come one per latent frame, ``(B, frames)``
            (diffusion forcing); token layers' rows are frame-major, so each frame's mask
            repeats over its tokens.
        call_timestep: ``kwargs -> t or None``: calls the model runs at a timestep of its own
            whatever its argument (Wan-Animate 2's reference pass, ``kv_cache_mode="extract"``,
            runs at ``t = 1``), in scheduler units; those calls are masked by it.
        num_train_timesteps: ``T`` for pipelines whose scheduler has no ``num_train_timesteps``
            (Würstchen's prior counts ratios, ``T = 1``) or that have no scheduler (Echo).
        layer_timesteps: other ``forward`` arguments that carry the timestep of some layers,
            ``arg -> path -> bool`` (LTX-2's audio layers follow ``audio_timestep``); they are
            converted like the main one, and a call that omits them masks those layers by it.
        recipes: training recipes by pipeline class name (:mod:`tlora_diffusers.training.recipes`).
    """

    name: str
    denoisers: tuple[str, ...]
    timestep_arg: str = "timestep"
    convention: Optional[Convention] = SCHEDULER_UNITS
    pipeline_attrs: tuple[str, ...] = ("transformer",)
    pipelines: tuple[str, ...] = ()
    default_targets: tuple[str, ...] = ()
    token_layers: Optional[Callable[[str], bool]] = None
    video: bool = False
    recipes: Mapping[str, Any] = field(default_factory=dict)
    frame_tokens: bool = False
    layer_timesteps: Mapping[str, Callable[[str], bool]] = field(default_factory=dict)
    num_train_timesteps: Optional[int] = None
    call_timestep: Optional[Callable[[Mapping[str, Any]], Optional[float]]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", self.name):
            raise ValueError(f"ModelFamily.name must be a lowercase identifier like 'flux', got {self.name!r}")
        denoisers = (self.denoisers,) if isinstance(self.denoisers, str) else tuple(self.denoisers)
        if not denoisers or not all(isinstance(d, str) and d.isidentifier() for d in denoisers):
            raise ValueError(f"ModelFamily.denoisers must be class names, got {self.denoisers!r}")
        object.__setattr__(self, "denoisers", denoisers)
        if not isinstance(self.timestep_arg, str) or not self.timestep_arg.isidentifier():
            raise ValueError(f"ModelFamily.timestep_arg must be a parameter name, got {self.timestep_arg!r}")
        if self.convention is not None and not isinstance(self.convention, Convention):
            raise TypeError(
                f"ModelFamily.convention must be a tlora_diffusers.models.conventions.Convention, got "
                f"{type(self.convention).__name__}"
            )
        for name in ("pipeline_attrs", "pipelines", "default_targets"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        object.__setattr__(self, "recipes", dict(self.recipes))
        object.__setattr__(self, "layer_timesteps", dict(self.layer_timesteps))


_REGISTRY: dict[str, ModelFamily] = {}
_BY_CLASS: dict[str, str] = {}
_LOADED = False
_GUARD = threading.RLock()


def _load_builtins() -> None:
    global _LOADED
    with _GUARD:
        if _LOADED:
            return
        _LOADED = True
        for module in BUILTIN_FAMILIES:
            family = importlib.import_module(f"{__name__}.{module}").FAMILY
            _register(family, replace=False)


def _register(family: ModelFamily, replace: bool) -> None:
    with _GUARD:
        if not replace:
            if family.name in _REGISTRY:
                raise ValueError(
                    f"a model family named {family.name!r} is already registered; pass replace=True to replace it"
                )
            taken = [(c, _BY_CLASS[c]) for c in family.denoisers if c in _BY_CLASS]
            if taken:
                cls, owner = taken[0]
                raise ValueError(
                    f"{cls} already belongs to the registered model family {owner!r}; pass replace=True to "
                    "replace that family's handling of it"
                )
        old = _REGISTRY.get(family.name)
        if old is not None:
            for cls in old.denoisers:
                _BY_CLASS.pop(cls, None)
        for cls in family.denoisers:
            owner = _BY_CLASS.get(cls)
            if owner is not None and owner != family.name:
                stale = _REGISTRY[owner]
                rest = tuple(c for c in stale.denoisers if c != cls)
                if rest:
                    _REGISTRY[owner] = ModelFamily(**{**_fields(stale), "denoisers": rest})
                else:
                    del _REGISTRY[owner]
            _BY_CLASS[cls] = family.name
        _REGISTRY[family.name] = family


def _fields(family: ModelFamily) -> dict[str, Any]:
    return {f: getattr(family, f) for f in family.__dataclass_fields__ if not f.startswith("_")}


def register_model_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Teach tlora_diffusers a family of denoisers; a name or class already known needs ``replace=True``.

    Example:
        >>> register_model_family(ModelFamily("my-dit", ("MyDiTModel",), convention=conventions.FRACTION))
    """
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_model_family takes a ModelFamily, got {type(family).__name__}")
    _load_builtins()
    _register(family, replace)
    return family


def model_families() -> dict[str, ModelFamily]:
    """Every registered family by name (built-ins first)."""
    _load_builtins()
    return dict(_REGISTRY)


def supported_models() -> list[str]:
    """Class names of every denoiser with a registered family."""
    _load_builtins()
    return sorted(_BY_CLASS)


def find_family(module: Any) -> Optional[ModelFamily]:
    """The family of ``module``'s class or of its nearest base class with one, else ``None``."""
    _load_builtins()
    for cls in type(module).__mro__:
        owner = _BY_CLASS.get(cls.__name__)
        if owner is not None:
            return _REGISTRY[owner]
    return None


def family_of(module: nn.Module) -> ModelFamily:
    """:func:`find_family`, or an error that lists what is supported and how to add a family."""
    family = find_family(module)
    if family is not None:
        return family
    describe(module, need_declared=True)  # raises the error that says how to register it
    raise AssertionError("unreachable")  # pragma: no cover


from .generic import Denoiser, describe, pipeline_denoisers, timestep_parameter  # noqa: E402
