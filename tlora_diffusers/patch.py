"""TLoRAPatch: per-call T-LoRA rank masking on a stock diffusers pipeline or denoiser."""

from __future__ import annotations

import contextvars
import functools
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import torch.nn as nn

from .backends import active_adapters, find_mask_sites, loaded_adapters
from .config import TLoRAConfig
from .metadata import adapter_schedules
from .models.generic import Denoiser, describe, is_text_model, pipeline_denoisers
from .runtime.attachment import (CURRENT_RUN, Attachment, Binding, RunState, _valid_T, attachment_of, pipeline_T,
                                 warn_video)
from .runtime.clock import LoopClock, components_of, pipeline_refusal

__all__ = ["TLoRAPatch"]

_PATCH_ATTR = "_tlora_patch"
_PATCHED_CLASSES: dict[type, type] = {}
Configs = Union[None, TLoRAConfig, Mapping[str, TLoRAConfig]]


def _patch_of(pipeline: Any) -> Optional["TLoRAPatch"]:
    return vars(pipeline).get(_PATCH_ATTR)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)  # torch.compile's OptimizedModule


def _patched_pipeline_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` runs in its own context with its patch active."""
    sub = _PATCHED_CLASSES.get(cls)
    if sub is None:

        @functools.wraps(cls.__call__)
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            patch = _patch_of(self)
            if patch is None:  # copied with the class but never patched
                return cls.__call__(self, *args, **kwargs)
            return contextvars.copy_context().run(patch._run_pipeline, cls.__call__, self, args, kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__, "_tlora_base_class": cls})
        _PATCHED_CLASSES[cls] = sub
    return sub


def _as_names(adapter_names: Union[None, str, Sequence[str]]) -> Optional[list[str]]:
    if adapter_names is None:
        return None
    names = [adapter_names] if isinstance(adapter_names, str) else list(dict.fromkeys(adapter_names))
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"adapter_names must name at least one adapter, got {adapter_names!r}")
    return names


def _check_cfg(cfg: Configs) -> None:
    if cfg is None or isinstance(cfg, TLoRAConfig):
        return
    if isinstance(cfg, Mapping) and cfg and all(isinstance(k, str) and isinstance(v, TLoRAConfig)
                                                for k, v in cfg.items()):
        return
    raise TypeError(
        "cfg must be a TLoRAConfig, or a dict of adapter name -> TLoRAConfig (one schedule per adapter), got "
        f"{cfg!r}"
    )


class TLoRAPatch:
    """Mask T-LoRA ranks by each denoiser call's timestep, on a stock pipeline or a bare denoiser.

    Attaches to every denoiser of the pipeline that carries LoRA layers (``unet``,
    ``transformer``, Wan 2.2's ``transformer_2``, Ideogram4's ``unconditional_transformer``,
    a ``controlnet``; classic and modular pipelines alike). In a pipeline run, a call whose
    timestep is the same for the whole batch is masked by the loop's own timestep
    (``pipe.current_timestep``, the guider's state or ``scheduler.timesteps[step_index]``),
    exact in every dtype; the denoiser's argument, converted by its family's convention or
    by one inferred from the loop for classes no family names, verifies it at every call
    and carries per-sample (``(B,)``) and per-token (``(B, tokens)``) structure. Outside a
    run (training, your own loop) the argument, converted, is the timestep.
    ``T = pipe.scheduler.config.num_train_timesteps``.

    Args:
        target: a diffusers pipeline (classic or modular), or a denoiser module.
        cfg: the schedule: one :class:`TLoRAConfig` for every masked adapter, a dict of
            adapter name -> config (one schedule per adapter; it also selects the adapters),
            or ``None`` to read each adapter's config from the file it was loaded from.
        adapter_names: adapters to mask; default every active adapter (other LoRAs, e.g. a
            style LoRA, then need a T-LoRA config too, or leave them out with this).
        num_train_timesteps: ``T`` for a bare denoiser (default: what its model family declares, else 1000;
            pipelines read their scheduler).
        fast: deprecated and ignored (the mask path runs): see ``benchmarks/README.md``.

    Example:
        >>> pipe.load_lora_weights("my-tlora")
        >>> with TLoRAPatch(pipe):
        ...     image = pipe("a sks dog").images[0]
    """

    def __init__(
        self,
        target: Union[nn.Module, Any],
        cfg: Configs = None,
        *,
        adapter_names: Union[None, str, Sequence[str]] = None,
        num_train_timesteps: Optional[int] = None,
        fast: bool = False,
    ) -> None:
        _check_cfg(cfg)
        if fast:
            warnings.warn(
                "TLoRAPatch(fast=True) is deprecated and ignored: the merge-into-weights fast path measured slower "
                "than the mask path (benchmarks/README.md) and the mask path now costs O(1) host work per call",
                FutureWarning, stacklevel=2,
            )
        self.fast = False
        names = _as_names(adapter_names)
        if isinstance(cfg, Mapping) and names is None:
            names = list(cfg)
        self._removed = False
        self._components: dict[str, int] = {}
        if isinstance(target, nn.Module):
            self.pipeline = None
            self._bare_timesteps = None  # set by _bare_T once the denoiser is described
            candidates = {None: _unwrap(target)}
        else:
            self.pipeline = target
            if not hasattr(target, "components"):
                raise TypeError(
                    f"TLoRAPatch needs a diffusers pipeline or a denoiser nn.Module; got {type(target).__name__}"
                )
            if num_train_timesteps is not None:
                raise TypeError("num_train_timesteps is read from pipe.scheduler; pass it only with a bare denoiser")
            refusal = pipeline_refusal(target)
            if refusal:
                raise ValueError(refusal)
            self._bare_timesteps = None
            candidates = self._pipeline_denoisers(target)
        self._bindings = self._plan(candidates, cfg, names)
        if self.pipeline is None:
            self._bare_timesteps = self._bare_T(num_train_timesteps)
        self.num_train_timesteps  # validates T now
        self._check_not_patched()
        self._install()
        if self.pipeline is not None:
            self._components = self._component_ids()

    def _bare_T(self, given: Optional[int]) -> int:
        """``T`` of a bare denoiser: what its family declares (Würstchen's prior counts ratios, T = 1), else 1000;
        a ``num_train_timesteps`` that contradicts the family's would mask every call wrongly, so it is refused."""
        declared = {getattr(b.info.family, "num_train_timesteps", None) for b in self._bindings} - {None}
        if not declared:
            return 1000 if given is None else given
        (family_T,) = declared
        if given is not None and given != family_T:
            raise ValueError(f"num_train_timesteps={given!r} contradicts the {self._bindings[0].info.family.name} "
                             f"model family, whose timesteps run to T = {family_T}; leave it out")
        return family_T

    # -- planning (nothing is changed until every part is valid) ------------------------------
    def _pipeline_denoisers(self, pipe: Any) -> dict[Optional[str], nn.Module]:
        found = pipeline_denoisers(pipe)
        for name, value in components_of(pipe).items():
            module = _unwrap(value) if isinstance(value, nn.Module) else None
            if module is None or name in found or name.startswith("_") or is_text_model(module):
                continue
            if active_adapters(module):
                raise TypeError(
                    f"pipe.{name} ({type(module).__name__}) carries LoRA layers, but its forward takes no timestep "
                    "tlora_diffusers can find (a parameter named timestep, timesteps or t): a T-LoRA there cannot be "
                    "masked. Register its family with the timestep argument: tlora_diffusers.models."
                    f"register_model_family(ModelFamily(name=..., denoisers=({type(module).__name__!r},), "
                    "timestep_arg=...))"
                )
        if not found:
            raise TypeError(
                f"{type(pipe).__name__} has no denoiser (a component whose forward takes a timestep); components: "
                f"{sorted(k for k, v in components_of(pipe).items() if isinstance(v, nn.Module))}"
            )
        return found

    def _plan(self, candidates: dict, cfg: Configs, names: Optional[list[str]]) -> list[Binding]:
        bindings, seen = [], set()
        for attr, denoiser in candidates.items():
            name = type(denoiser).__name__ if attr is None else f"pipe.{attr}"
            if names is None:
                adapters = active_adapters(denoiser)
            else:
                loaded = set(loaded_adapters(denoiser))
                adapters = [a for a in names if a in loaded]
            if not adapters and attr is not None:
                continue  # (a refused denoiser without a LoRA, e.g. Stable unCLIP's prior, is left alone)
            info = describe(denoiser, need_declared=attr is None)  # a bare denoiser has no loop to infer from
            if not adapters:
                continue
            seen.update(adapters)
            configs = adapter_schedules(denoiser, adapters, cfg, name, selected=names is not None)
            sites = find_mask_sites(denoiser, configs, name)
            bindings.append(Binding(self, denoiser, info, configs, sites, name, watch_new_adapters=names is None))
        where = "the pipeline's denoisers" if self.pipeline is not None else type(next(iter(candidates.values()))).__name__
        if names is not None:
            missing = [a for a in names if a not in seen]
            if missing:
                found = sorted({a for d in candidates.values() for a in loaded_adapters(d)})
                raise ValueError(f"adapter(s) {missing} have no LoRA layers in {where}; adapters found: {found or 'none'}")
        if not bindings:
            names = [type(d).__name__ if a is None else f"pipe.{a}" for a, d in candidates.items()]
            raise ValueError(
                f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} no LoRA layers to mask: load a LoRA first "
                "(pipe.load_lora_weights(...) or denoiser.add_adapter(LoraConfig(...)))"
            )
        if isinstance(cfg, Mapping):
            unused = [a for a in cfg if a not in seen]
            if unused:
                raise ValueError(f"cfg names adapter(s) {unused} that no denoiser of this target carries")
        return bindings

    def _check_not_patched(self) -> None:
        if self.pipeline is not None and _patch_of(self.pipeline) is not None:
            raise RuntimeError(
                f"this {type(self.pipeline).__name__} is already T-LoRA patched; call .remove() on the existing "
                "patch before patching it again"
            )
        for binding in self._bindings:
            attachment = attachment_of(binding.denoiser)
            if attachment is not None and (self.pipeline is None or any(b.owner.pipeline is None
                                                                        for b in attachment.bindings)):
                raise RuntimeError(
                    f"this {type(binding.denoiser).__name__} is already T-LoRA patched; call .remove() on the existing "
                    "patch first (several pipelines sharing one denoiser may each be patched)"
                )

    def _install(self) -> None:
        done: list[Binding] = []
        owners: dict[int, Attachment] = {}  # id(LoRA layer) -> the attachment that masks it first
        try:
            for binding in self._bindings:
                attachment = attachment_of(binding.denoiser)
                if attachment is None:
                    shared = next((owners[id(s.module)] for s in binding.sites if id(s.module) in owners), None)
                    if shared is not None:  # layers shared with an earlier denoiser: one slot for both
                        shared.shares_layers = True
                        shared._regroup()
                    attachment = Attachment(binding.denoiser, binding.name, shared.slot if shared else None)
                for site in binding.sites:
                    owners.setdefault(id(site.module), attachment)
                try:
                    attachment.add(binding)
                except BaseException:
                    if not attachment.bindings:
                        attachment.discard(binding)
                    raise
                done.append(binding)
                warn_video(binding.info)
            if self.pipeline is not None:
                vars(self.pipeline)[_PATCH_ATTR] = self
                self.pipeline.__class__ = _patched_pipeline_class(type(self.pipeline))
        except BaseException:
            for binding in done:
                attachment = attachment_of(binding.denoiser)
                if attachment is not None:
                    attachment.discard(binding)
            raise

    def _component_ids(self) -> dict[str, int]:
        return {k: id(v) for k, v in components_of(self.pipeline).items() if isinstance(v, nn.Module)}

    # -- per run ----------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        """``T`` of the schedule: the pipeline scheduler's ``num_train_timesteps`` at call time (a scheduler
        without one, or a pipeline without a scheduler: what the denoisers' families declare)."""
        if self.pipeline is None:
            return _valid_T(self._bare_timesteps, "num_train_timesteps")
        return pipeline_T(self.pipeline, [b.info for b in self._bindings])

    def _run_pipeline(self, call: Any, pipe: Any, args: tuple, kwargs: dict) -> Any:
        self.check()
        self._check_components()
        refusal = pipeline_refusal(pipe)
        if refusal:
            raise ValueError(refusal)
        clock = LoopClock(pipe) if components_of(pipe).get("scheduler") is not None else None
        CURRENT_RUN.set(RunState(self, pipe, clock, self.num_train_timesteps))
        return call(pipe, *args, **kwargs)

    def _check_components(self) -> None:
        """Refuse a run whose pipeline had a denoiser replaced, or gained one with LoRA layers, since patching."""
        now = self._component_ids()
        if now == self._components:
            return
        patched = {b.name.removeprefix("pipe."): b.denoiser for b in self._bindings}
        for attr, denoiser in patched.items():
            current = components_of(self.pipeline).get(attr)
            if current is None or _unwrap(current) is not denoiser:
                raise RuntimeError(
                    f"pipe.{attr} was replaced since patching (now {type(current).__name__}): the patch masks the "
                    f"{type(denoiser).__name__} it was attached to, and a LoRA in the new one would run unmasked. "
                    "remove() this patch and patch the pipeline again"
                )
        for attr, value in components_of(self.pipeline).items():
            if attr in patched or not isinstance(value, nn.Module) or self._components.get(attr) == id(value):
                continue
            module = _unwrap(value)
            if not is_text_model(module) and active_adapters(module):
                raise RuntimeError(
                    f"pipe.{attr} ({type(module).__name__}) was set since patching and carries LoRA layers that this "
                    "patch does not mask: remove() this patch and patch the pipeline again"
                )
        self._components = now

    def check(self) -> None:
        """Raise if a masked adapter was fused, unloaded, replaced or hotswapped without a schedule since
        patching, or (when ``adapter_names`` was not given) another adapter became active.

        Runs at the start of every pipeline call and of every bare denoiser call; costs
        microseconds (no module walk).
        """
        if self._removed:
            raise RuntimeError("this TLoRAPatch was removed")
        for binding in self._bindings:
            binding.check()

    # -- handle -----------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        """The (first) patched denoiser."""
        return self._bindings[0].denoiser

    @property
    def denoisers(self) -> dict[str, nn.Module]:
        """Every patched denoiser by pipeline attribute (or class name for a bare denoiser)."""
        return {b.name.removeprefix("pipe."): b.denoiser for b in self._bindings}

    @property
    def configs(self) -> dict[str, TLoRAConfig]:
        """Each masked adapter's schedule (adapters of several denoisers share names only if they share configs)."""
        out: dict[str, TLoRAConfig] = {}
        for binding in self._bindings:
            out.update(binding.configs)
        return out

    @property
    def config(self) -> TLoRAConfig:
        """The schedule, when every masked adapter has the same one (else see :attr:`configs`)."""
        configs = set(self.configs.values())
        if len(configs) != 1:
            raise AttributeError(f"the masked adapters have different schedules; read .configs: {self.configs}")
        return configs.pop()

    @property
    def adapter_names(self) -> list[str]:
        return list(dict.fromkeys(a for b in self._bindings for a in b.configs))

    @property
    def layer_names(self) -> list[str]:
        """The masked layers, as ``module path (adapter name)`` (prefixed by the denoiser for several)."""
        several = len(self._bindings) > 1
        return [f"{b.name}.{s.name}" if several else s.name for b in self._bindings for s in b.sites]

    @property
    def families(self) -> dict[str, Denoiser]:
        """What the patch knows about each denoiser: its family (or class) name, timestep argument, convention."""
        return {b.name: b.info for b in self._bindings}

    @property
    def conventions(self) -> dict[str, Optional[str]]:
        """Each denoiser's timestep convention: declared, settled from the loop, or ``None`` while still open."""
        return {b.name: (b.guess.settled.description if b.guess.settled is not None else None) for b in self._bindings}

    def remove(self) -> None:
        """Detach every hook, restore layers and the pipeline class bit for bit; idempotent."""
        if self._removed:
            return
        self._removed = True
        try:
            for binding in self._bindings:
                attachment = attachment_of(binding.denoiser)
                if attachment is not None:
                    attachment.discard(binding)
        finally:
            if self.pipeline is not None and _patch_of(self.pipeline) is self:
                del vars(self.pipeline)[_PATCH_ATTR]
                base = getattr(type(self.pipeline), "_tlora_base_class", None)
                if base is not None and type(self.pipeline) is _PATCHED_CLASSES.get(base):
                    self.pipeline.__class__ = base

    def __enter__(self) -> "TLoRAPatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{sum(len(b.sites) for b in self._bindings)} layers"
        names = ", ".join(b.name for b in self._bindings)
        return f"TLoRAPatch({names}, {self.configs}, {state})"
