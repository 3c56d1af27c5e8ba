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
import inspect
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch.nn as nn

from . import conventions
from .conventions import SCHEDULER_UNITS, Convention

__all__ = [
    "ModelFamily", "register_model_family", "family_of", "find_family", "model_families", "supported_models",
    "BUILTIN_FAMILIES", "token_layer_rule", "conventions", "pipeline_denoisers",
]

#: Modules of the built-in families (imported on first lookup; none of them imports diffusers).
BUILTIN_FAMILIES = (
    "stable_diffusion", "sd3", "flux", "flux2", "qwen_image", "z_image", "chroma", "hidream", "sana", "pixart",
    "auraflow", "lumina2", "cogview4", "wan", "ltx_video", "hunyuan_video", "cogvideox", "mochi",
)


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
            (:mod:`tlora_diffusers.models.conventions`).
        pipeline_attrs: pipeline attributes that may hold this family's denoisers
            (Wan 2.2: ``("transformer", "transformer_2")``).
        pipelines: names of the stock pipelines of the family (documentation and tests).
        default_targets: PEFT ``target_modules`` the trainer uses by default.
        token_layers: for families whose pipelines pass one timestep per token
            (``(B, seq)``): ``path -> bool``, true for layers whose rows are those tokens.
            Other layers use each sample's largest timestep.
        video: the denoiser works on temporally compressed video latents (masks there are
            experimental; patching logs one warning).
        recipes: training recipes by pipeline class name (:mod:`tlora_diffusers.training.recipes`).
    """

    name: str
    denoisers: tuple[str, ...]
    timestep_arg: str = "timestep"
    convention: Convention = SCHEDULER_UNITS
    pipeline_attrs: tuple[str, ...] = ("transformer",)
    pipelines: tuple[str, ...] = ()
    default_targets: tuple[str, ...] = ()
    token_layers: Optional[Callable[[str], bool]] = None
    video: bool = False
    recipes: Mapping[str, Any] = field(default_factory=dict)
    _positions: dict = field(default_factory=dict, repr=False, compare=False, hash=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", self.name):
            raise ValueError(f"ModelFamily.name must be a lowercase identifier like 'flux', got {self.name!r}")
        denoisers = (self.denoisers,) if isinstance(self.denoisers, str) else tuple(self.denoisers)
        if not denoisers or not all(isinstance(d, str) and d.isidentifier() for d in denoisers):
            raise ValueError(f"ModelFamily.denoisers must be class names, got {self.denoisers!r}")
        object.__setattr__(self, "denoisers", denoisers)
        if not isinstance(self.timestep_arg, str) or not self.timestep_arg.isidentifier():
            raise ValueError(f"ModelFamily.timestep_arg must be a parameter name, got {self.timestep_arg!r}")
        if not isinstance(self.convention, Convention):
            raise TypeError(
                f"ModelFamily.convention must be a tlora_diffusers.models.conventions.Convention, got "
                f"{type(self.convention).__name__}"
            )
        for name in ("pipeline_attrs", "pipelines", "default_targets"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        object.__setattr__(self, "recipes", dict(self.recipes))

    # -- reading one call ------------------------------------------------------------------
    def raw_timestep(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The timestep argument of this ``forward`` call, as the pipeline passed it."""
        t = kwargs.get(self.timestep_arg)
        if t is None:
            position = self._position(type(module))
            if position is not None and position < len(args):
                t = args[position]
        if t is None:
            raise ValueError(
                f"{type(module).__name__}.forward was called without `{self.timestep_arg}` (model family "
                f"{self.name!r}): a T-LoRA needs the timestep of every denoiser call"
            )
        return t

    def _position(self, cls: type) -> Optional[int]:
        with self._lock:
            if cls not in self._positions:
                params = [p.name for p in inspect.signature(cls.forward).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                self._positions[cls] = params.index(self.timestep_arg) - 1 if self.timestep_arg in params else None
            return self._positions[cls]

    def check_signature(self, module: nn.Module) -> None:
        """Refuse a denoiser whose ``forward`` has no parameter named :attr:`timestep_arg`."""
        params = inspect.signature(type(module).forward).parameters
        if self.timestep_arg not in params:
            names = [n for n in params if n != "self"]
            raise ValueError(
                f"{type(module).__name__}.forward has no parameter {self.timestep_arg!r} (model family "
                f"{self.name!r}); its parameters are {names}. Register a family whose timestep_arg names the "
                "timestep parameter"
            )


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
    name = type(module).__name__
    arg = _guess_timestep_arg(module)
    raise TypeError(
        f"no T-LoRA model family knows {name}; supported: {', '.join(supported_models())}. Describe it with "
        f"tlora_diffusers.models.register_model_family(ModelFamily(name=..., denoisers=({name!r},), "
        f"timestep_arg={arg!r}, convention=conventions.<what the pipeline passes: SCHEDULER_UNITS, FRACTION "
        "(t / 1000), REVERSED_FRACTION, ...>)); the first pipeline call checks the convention against the "
        "pipeline's own timesteps"
    )


def _guess_timestep_arg(module: nn.Module) -> str:
    try:
        params = list(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return "timestep"
    for candidate in ("timestep", "timesteps", "t", "sigma", "noise_level"):
        if candidate in params:
            return candidate
    return next((p for p in params if "time" in p), "timestep")


def pipeline_denoisers(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's components that belong to a registered family (``torch.compile`` wrappers unwrapped),
    ordered as the families list their ``pipeline_attrs`` (``unet`` before ``controlnet``)."""
    found = {}
    for name, value in vars(pipe).items():
        if isinstance(value, nn.Module):
            module = getattr(value, "_orig_mod", value)
            if find_family(module) is not None:
                found[name] = module
    order = {a: i for m in found.values() for i, a in enumerate(find_family(m).pipeline_attrs)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])))
