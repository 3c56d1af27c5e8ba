"""TLoRAPatch: per-call T-LoRA rank masking on a stock diffusers pipeline or denoiser."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import torch.nn as nn

from ._attach import CURRENT_RUN, Attachment, DenoiserPatch, RunState, attachment_of, warn_video
from ._verify import check_scheduler
from .backends import active_adapters, find_mask_sites, loaded_adapters
from .config import TLoRAConfig
from .models import ModelFamily, family_of, find_family, pipeline_denoisers

__all__ = ["TLoRAPatch"]

_PATCH_ATTR = "_tlora_patch"
_PATCHED_CLASSES: dict[type, type] = {}
Configs = Union[None, TLoRAConfig, Mapping[str, TLoRAConfig]]


def _patch_of(pipeline: Any) -> Optional["TLoRAPatch"]:
    return vars(pipeline).get(_PATCH_ATTR)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)  # torch.compile's OptimizedModule


def _is_text_model(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("transformers.", "open_clip"))


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


def _file_configs(denoiser: nn.Module, adapters: Sequence[str], name: str,
                  explicit: Mapping[str, TLoRAConfig]) -> dict[str, TLoRAConfig]:
    """The T-LoRA configs that loaded files carry, for adapters whose weights are still those files'.

    A config whose weights were hotswapped away is an error unless ``explicit`` gives the adapter's schedule.
    """
    from .io.format import config_from_peft, fingerprint_matches

    peft_configs = getattr(denoiser, "peft_config", None) or {}
    found = {}
    for adapter in adapters:
        meta = config_from_peft(peft_configs.get(adapter))
        if meta is None:
            continue
        if not fingerprint_matches(denoiser, adapter, meta):
            if adapter in explicit:
                continue
            raise ValueError(
                f"adapter {adapter!r} of {name} carries a T-LoRA config {meta.config} whose weights are no longer "
                "loaded (hotswapped without a patch attached, or changed in place), so its schedule is unknown: "
                f"pass it, TLoRAPatch(pipe, {{{adapter!r}: TLoRAConfig(max_rank=..., min_rank=..., alpha=...)}}), or "
                "load the file again without hotswap"
            )
        found[adapter] = meta.config
    return found


def _resolve_configs(denoiser: nn.Module, adapters: list[str], cfg: Configs, name: str,
                     selected: bool) -> dict[str, TLoRAConfig]:
    """Each adapter's schedule: from ``cfg`` (one for all, or per adapter) or from its file; contradictions are errors."""
    explicit = dict(cfg) if isinstance(cfg, Mapping) else {a: cfg for a in adapters} if cfg is not None else {}
    from_files = _file_configs(denoiser, adapters, name, explicit)
    out, missing = {}, []
    for adapter in adapters:
        given, filed = explicit.get(adapter), from_files.get(adapter)
        if given is None:
            if filed is None:
                missing.append(adapter)
            else:
                out[adapter] = filed
            continue
        if filed is not None:
            if (given.max_rank, given.min_rank, given.alpha) != (filed.max_rank, filed.min_rank, filed.alpha):
                raise ValueError(
                    f"cfg={given} contradicts the T-LoRA config {filed} loaded with adapter {adapter!r}; omit cfg to "
                    "use the file's config"
                )
            given = dataclasses.replace(given, layout=filed.layout)  # the file knows how its ranks are encoded
        out[adapter] = given
    if missing:
        with_files = [a for a in adapters if a in from_files]
        hint = (f"If {missing} are ordinary LoRAs (a style LoRA, say), mask only the T-LoRA adapters: "
                f"TLoRAPatch(pipe, adapter_names={with_files!r}). " if with_files and not selected else "")
        raise ValueError(
            f"no T-LoRA config was found for adapter(s) {missing} of {name} (files saved by tlora_diffusers carry "
            f"one; a bare denoiser's load_lora_adapter(path) keeps a file's metadata only with use_safetensors=True). "
            f"{hint}Otherwise pass the schedule it was trained with: TLoRAPatch(pipe, "
            f"TLoRAConfig(max_rank=..., min_rank=..., alpha=...)) or one per adapter, "
            f"TLoRAPatch(pipe, {{{missing[0]!r}: TLoRAConfig(...)}})"
        )
    return out


def _warn_lora_bias(sites: Sequence[Any], configs: Mapping[str, TLoRAConfig], name: str) -> None:
    """PEFT's ``lora_bias`` adds ``lora_B``'s bias after the rank bottleneck: no mask reaches it."""
    for adapter, cfg in configs.items():
        biased = [s for s in sites if s.adapter == adapter and s.peft_layer is not None
                  and getattr(s.peft_layer, "lora_bias", {}).get(adapter, False)]
        if biased and cfg.min_rank == 0:
            warnings.warn(
                f"adapter {adapter!r} of {name} has lora_bias=True: lora_B's bias is added at every step whatever the "
                "mask, so with min_rank=0 the adapter is not fully off at t=T (its bias still applies)",
                UserWarning, stacklevel=4,
            )


class TLoRAPatch:
    """Mask T-LoRA ranks by each denoiser call's own timestep, on a stock pipeline or a bare denoiser.

    Attaches to every denoiser of the pipeline that carries LoRA layers (``unet``,
    ``transformer``, Wan 2.2's ``transformer_2``, a ``controlnet``). For every denoiser call
    it reads that call's timestep, converts it to scheduler units with the denoiser's
    :class:`~tlora_diffusers.models.ModelFamily` convention, checks it against the
    pipeline's own loop timestep at the run's first call, builds each adapter's rank mask
    for ``T = pipe.scheduler.config.num_train_timesteps`` and applies it to that call only.
    A ``(B,)`` timestep masks each sample separately; a ``(B, tokens)`` one each token.

    Args:
        target: a diffusers pipeline, or a denoiser module.
        cfg: the schedule: one :class:`TLoRAConfig` for every masked adapter, a dict of
            adapter name -> config (one schedule per adapter; it also selects the adapters),
            or ``None`` to read each adapter's config from the file it was loaded from.
        adapter_names: adapters to mask; default every active adapter (other LoRAs, e.g. a
            style LoRA, then need a T-LoRA config too, or leave them out with this).
        num_train_timesteps: ``T`` for a bare denoiser (pipelines read their scheduler).
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
        if isinstance(target, nn.Module):
            self.pipeline = None
            self._bare_timesteps = 1000 if num_train_timesteps is None else num_train_timesteps
            candidates = {None: _unwrap(target)}
        else:
            self.pipeline = target
            if not hasattr(target, "components"):
                raise TypeError(
                    f"TLoRAPatch needs a diffusers pipeline or a denoiser nn.Module; got {type(target).__name__}"
                )
            if num_train_timesteps is not None:
                raise TypeError("num_train_timesteps is read from pipe.scheduler; pass it only with a bare denoiser")
            if getattr(target, "scheduler", None) is None:
                raise ValueError(f"{type(target).__name__} has no scheduler to read num_train_timesteps from")
            check_scheduler(target)
            self._bare_timesteps = None
            candidates = self._pipeline_denoisers(target)
        self.num_train_timesteps  # validates T now
        self._parts = self._plan(candidates, cfg, names)
        self._check_not_patched()
        self._install()

    # -- planning (nothing is changed until every part is valid) ------------------------------
    def _pipeline_denoisers(self, pipe: Any) -> dict[Optional[str], nn.Module]:
        found = pipeline_denoisers(pipe)
        if not found:
            raise TypeError(
                f"{type(pipe).__name__} has no denoiser of a known model family; components: "
                f"{sorted(k for k, v in vars(pipe).items() if isinstance(v, nn.Module))}"
            )
        for name, value in vars(pipe).items():
            module = _unwrap(value) if isinstance(value, nn.Module) else None
            if module is None or name in found or _is_text_model(module) or not active_adapters(module):
                continue
            family_of(module)  # a denoiser-like component with LoRA layers but no family: say so
        return found

    def _plan(self, candidates: dict, cfg: Configs, names: Optional[list[str]]) -> list[DenoiserPatch]:
        parts, seen = [], set()
        for attr, denoiser in candidates.items():
            name = type(denoiser).__name__ if attr is None else f"pipe.{attr}"
            family = family_of(denoiser) if attr is None else find_family(denoiser)
            family.check_signature(denoiser)
            if names is None:
                adapters = active_adapters(denoiser)
            else:
                loaded = set(loaded_adapters(denoiser))
                adapters = [a for a in names if a in loaded]
            if not adapters:
                continue
            seen.update(adapters)
            configs = _resolve_configs(denoiser, adapters, cfg, name, selected=names is not None)
            sites = find_mask_sites(denoiser, configs, name)
            _warn_lora_bias(sites, configs, name)
            parts.append(DenoiserPatch(self, denoiser, family, configs, sites, name, watch_new_adapters=names is None))
        where = "the pipeline's denoisers" if self.pipeline is not None else type(next(iter(candidates.values()))).__name__
        if names is not None:
            missing = [a for a in names if a not in seen]
            if missing:
                found = sorted({a for d in candidates.values() for a in loaded_adapters(d)})
                raise ValueError(f"adapter(s) {missing} have no LoRA layers in {where}; adapters found: {found or 'none'}")
        if not parts:
            names = [type(d).__name__ if a is None else f"pipe.{a}" for a, d in candidates.items()]
            raise ValueError(
                f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} no LoRA layers to mask: load a LoRA first "
                "(pipe.load_lora_weights(...) or denoiser.add_adapter(LoraConfig(...)))"
            )
        if isinstance(cfg, Mapping):
            unused = [a for a in cfg if a not in seen]
            if unused:
                raise ValueError(f"cfg names adapter(s) {unused} that no denoiser of this target carries")
        return parts

    def _check_not_patched(self) -> None:
        if self.pipeline is not None and _patch_of(self.pipeline) is not None:
            raise RuntimeError(
                f"this {type(self.pipeline).__name__} is already T-LoRA patched; call .remove() on the existing "
                "patch before patching it again"
            )
        for part in self._parts:
            attachment = attachment_of(part.denoiser)
            if attachment is not None and (self.pipeline is None or any(p.owner.pipeline is None
                                                                        for p in attachment.parts)):
                raise RuntimeError(
                    f"this {type(part.denoiser).__name__} is already T-LoRA patched; call .remove() on the existing "
                    "patch first (several pipelines sharing one denoiser may each be patched)"
                )

    def _install(self) -> None:
        done: list[DenoiserPatch] = []
        try:
            for part in self._parts:
                attachment = attachment_of(part.denoiser) or Attachment(part.denoiser, part.family, part.name)
                try:
                    attachment.add(part)
                except BaseException:
                    if not attachment.parts:
                        attachment.discard(part)
                    raise
                done.append(part)
                warn_video(part.family)
            if self.pipeline is not None:
                vars(self.pipeline)[_PATCH_ATTR] = self
                self.pipeline.__class__ = _patched_pipeline_class(type(self.pipeline))
        except BaseException:
            for part in done:
                attachment = attachment_of(part.denoiser)
                if attachment is not None:
                    attachment.discard(part)
            raise

    # -- per run ----------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        """``T`` of the schedule: the pipeline scheduler's ``num_train_timesteps`` at call time."""
        if self.pipeline is None:
            T, source = self._bare_timesteps, "num_train_timesteps"
        else:
            T = getattr(self.pipeline.scheduler.config, "num_train_timesteps", None)
            source = f"{type(self.pipeline.scheduler).__name__}.config.num_train_timesteps"
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"{source} must be an int >= 1, got {T!r}")
        return T

    def _run_pipeline(self, call: Any, pipe: Any, args: tuple, kwargs: dict) -> Any:
        self.check()
        check_scheduler(pipe)
        CURRENT_RUN.set(RunState(self))
        return call(pipe, *args, **kwargs)

    def check(self) -> None:
        """Raise if a masked adapter was fused, unloaded, replaced or hotswapped without a schedule since
        patching, or (when ``adapter_names`` was not given) another adapter became active.

        Runs at the start of every pipeline call and of every bare denoiser call; costs
        microseconds (no module walk).
        """
        if self._removed:
            raise RuntimeError("this TLoRAPatch was removed")
        for part in self._parts:
            part.check()

    # -- handle -----------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        """The (first) patched denoiser."""
        return self._parts[0].denoiser

    @property
    def denoisers(self) -> dict[str, nn.Module]:
        """Every patched denoiser by pipeline attribute (or class name for a bare denoiser)."""
        return {p.name.removeprefix("pipe."): p.denoiser for p in self._parts}

    @property
    def configs(self) -> dict[str, TLoRAConfig]:
        """Each masked adapter's schedule (adapters of several denoisers share names only if they share configs)."""
        out: dict[str, TLoRAConfig] = {}
        for part in self._parts:
            out.update(part.configs)
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
        return list(dict.fromkeys(a for p in self._parts for a in p.configs))

    @property
    def layer_names(self) -> list[str]:
        """The masked layers, as ``module path (adapter name)`` (prefixed by the denoiser for several)."""
        several = len(self._parts) > 1
        return [f"{p.name}.{s.name}" if several else s.name for p in self._parts for s in p.sites]

    @property
    def families(self) -> dict[str, ModelFamily]:
        return {p.name: p.family for p in self._parts}

    def remove(self) -> None:
        """Detach every hook, restore layers and the pipeline class bit for bit; idempotent."""
        if self._removed:
            return
        self._removed = True
        try:
            for part in self._parts:
                attachment = attachment_of(part.denoiser)
                if attachment is not None:
                    attachment.discard(part)
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
        state = "removed" if self._removed else f"{sum(len(p.sites) for p in self._parts)} layers"
        names = ", ".join(p.name for p in self._parts)
        return f"TLoRAPatch({names}, {self.configs}, {state})"
