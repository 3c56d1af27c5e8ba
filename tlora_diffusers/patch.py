"""TLoRAPatch: per-call T-LoRA rank masking on a stock diffusers pipeline or denoiser."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from ._context import _CURRENT, CallMask, broadcast_mask, use_call
from .backends import MaskSite, active_adapters, find_mask_sites
from .config import TLoRAConfig
from .models import ModelAdapter, get_model_adapter
from .fast import FastMerge, fast_path_blocker
from .schedule import active_rank, rank_mask

__all__ = ["TLoRAPatch"]

_DENOISER_ATTRS = ("unet", "transformer")

#: The fast-path merge state of the pipeline run in this context, if any.
_FAST_RUN: contextvars.ContextVar[Optional[FastMerge]] = contextvars.ContextVar("tlora_fast_run", default=None)
#: The patch whose pipeline is running in this context (set by the patched ``__call__``).
_PIPELINE_PATCH: contextvars.ContextVar[Optional["TLoRAPatch"]] = contextvars.ContextVar(
    "tlora_pipeline_patch", default=None
)
#: Where a patched denoiser keeps its shared hooks and a patched pipeline its patch. Attributes,
#: not module-level weak dictionaries: a dictionary value that points back at its key would keep
#: every patched model alive; an attribute is an ordinary cycle the garbage collector frees.
#: Both are deleted by ``remove()``.
_ATTACHMENT_ATTR = "_tlora_attachment"
_PATCH_ATTR = "_tlora_patch"


def _attachment_of(denoiser: nn.Module) -> Optional["_Attachment"]:
    return denoiser.__dict__.get(_ATTACHMENT_ATTR)


def _patch_of(pipeline: Any) -> Optional["TLoRAPatch"]:
    return vars(pipeline).get(_PATCH_ATTR)
_PATCHED_CLASSES: dict[type, type] = {}


class _CompiledSlot:
    """The current call's mask as seen from inside ``torch.compile``d code.

    Dynamo cannot trace ``ContextVar``; compiled layers read this plain holder instead.
    Its tensor is a graph input of constant shape, replaced (not rebuilt) every call, so
    a compiled denoiser never recompiles for a new timestep. It is per denoiser, so one
    compiled denoiser must not run concurrently from several threads.
    """

    __slots__ = ("owner", "mask")

    def __init__(self) -> None:
        self.owner: Optional[TLoRAPatch] = None
        self.mask: Optional[torch.Tensor] = None


class _Attachment:
    """Denoiser-level hooks shared by every patch on one denoiser.

    The pre-hook reads the call's own timestep, builds its mask and makes it the
    context's current call; the post-hook (``always_call``) clears it, also when
    ``forward`` raises.
    """

    def __init__(self, denoiser: nn.Module, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.patches: list[TLoRAPatch] = []
        self.compiled = _CompiledSlot()
        self.fast_run: Optional[FastMerge] = None
        self.checkpointable = [m for m in denoiser.modules() if hasattr(m, "gradient_checkpointing")]
        self.handles = [
            denoiser.register_forward_pre_hook(torch.compiler.disable(self._pre), with_kwargs=True),
            denoiser.register_forward_hook(torch.compiler.disable(self._post), always_call=True),
        ]

    def _resolve(self, module: nn.Module) -> "TLoRAPatch":
        patch = _PIPELINE_PATCH.get()
        if patch is not None and any(p is patch for p in self.patches):
            return patch
        if len(self.patches) == 1:
            return self.patches[0]
        raise RuntimeError(
            f"{type(module).__name__} carries {len(self.patches)} T-LoRA patches (pipelines sharing it); "
            "call it through one of the patched pipelines so the call knows whose config applies"
        )

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.fast_run is not None and _FAST_RUN.get() is not self.fast_run:
            raise RuntimeError(
                f"{type(module).__name__} is inside a fast=True pipeline run in another thread or context: its "
                "weights hold merged ranks until that run ends; fast=True excludes concurrent use of the denoiser"
            )
        patch = self._resolve(module)
        t = self.adapter.timestep(module, args, kwargs)
        T = patch.num_train_timesteps
        fast = _FAST_RUN.get()
        if fast is not None and _fast_step(fast, t, patch, T):
            return  # the ranks are in the weights and the LoRA branch is off: no mask to deliver
        call = CallMask(patch, module, rank_mask(t, patch.config, T))
        if torch.is_grad_enabled():
            _wrap_checkpointing(self.checkpointable)
        call.token = _CURRENT.set(call)
        self.compiled.owner, self.compiled.mask = patch, call.mask

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        call = _CURRENT.get()
        if call is not None and call.module is module and call.token is not None:
            token, call.token = call.token, None
            _CURRENT.reset(token)
            if self.compiled.mask is call.mask:
                self.compiled.owner = self.compiled.mask = None
            if call.hits == 0 and _FAST_RUN.get() is None and getattr(module, "_compiled_call_impl", None) is None:
                # No masked layer ran: disabled adapters are fine, a LoRA fused or unloaded since
                # patching is not (it would have run unmasked). Costs nothing on normal calls.
                call.owner.check()

    def remove(self, denoiser: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        _unwrap_checkpointing(denoiser)


def _fast_step(fast: FastMerge, t: Any, patch: "TLoRAPatch", T: int) -> bool:
    """Merge up to this call's rank (True), or fall back to the mask path (False) for per-sample
    timesteps, training calls and other denoisers.

    Reads the timestep on the host: the one device→host copy the fast path costs per call.
    """
    if patch is not fast.owner:
        return False  # another denoiser (e.g. a refiner called inside this run): not merged by this run
    values = None if torch.is_grad_enabled() else torch.as_tensor(t).reshape(-1).tolist()
    if values is None or any(v != values[0] for v in values):
        fast.restore()
        return False
    fast.merge_to(int(active_rank(float(values[0]), patch.config, T)))
    return True


class _MaskedCheckpointing:
    """Wraps a diffusers ``_gradient_checkpointing_func`` so recomputed forwards see the call's mask.

    Recomputation runs during ``backward``, after the denoiser call (and its mask) has
    ended, possibly on another thread; the wrapper closes over the call's mask instead.
    """

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, block: nn.Module, *args: Any) -> Any:
        call = _CURRENT.get()
        if call is None:
            return self.inner(block, *args)
        return self.inner(_BlockWithMask(block, call), *args)


class _BlockWithMask:
    """A checkpointed block bound to one call's mask (forward and recompute alike)."""

    __slots__ = ("block", "call")

    def __init__(self, block: nn.Module, call: CallMask) -> None:
        self.block, self.call = block, call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with use_call(self.call):
            return self.block(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.block, name)


def _wrap_checkpointing(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        inner = module.__dict__.get("_gradient_checkpointing_func")
        if inner is not None and not isinstance(inner, _MaskedCheckpointing):
            module._gradient_checkpointing_func = _MaskedCheckpointing(inner)


def _unwrap_checkpointing(denoiser: nn.Module) -> None:
    for module in denoiser.modules():
        inner = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(inner, _MaskedCheckpointing):
            module._gradient_checkpointing_func = inner.inner


class _RankMaskHook:
    """Forward hook on the module that outputs the rank dimension: multiplies by the call's mask."""

    __slots__ = ("owner", "rank_dim", "name", "paired", "slot")

    def __init__(self, owner: "TLoRAPatch", site: MaskSite, slot: _CompiledSlot) -> None:
        self.owner, self.slot = owner, slot
        self.rank_dim, self.name, self.paired = site.rank_dim, site.name, site.layout == "paired"

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if torch.compiler.is_compiling():
            if self.slot.owner is not self.owner or self.slot.mask is None:
                return None
            return output * broadcast_mask(self.slot.mask, output, self.rank_dim, self.paired)
        call = _CURRENT.get()
        if call is None or call.owner is not self.owner:
            return None
        mask = call.view_for(output, self.rank_dim, self.name, self.paired)
        # In place at inference (no new activation tensor); out of place when autograd records it.
        return output * mask if output.requires_grad else output.mul_(mask)


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

        sub = type(
            cls.__name__,
            (cls,),
            {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
             "_tlora_base_class": cls},
        )
        _PATCHED_CLASSES[cls] = sub
    return sub


def _resolve_config(
    denoiser: nn.Module, cfg: Optional[TLoRAConfig], adapter_names: Optional[Sequence[str]], name: str
) -> TLoRAConfig:
    """``cfg``, or the config the loaded T-LoRA files carry; a contradiction is an error."""
    from .io.format import config_from_peft

    if cfg is not None and not isinstance(cfg, TLoRAConfig):
        raise TypeError(f"cfg must be a TLoRAConfig, got {type(cfg).__name__}")
    adapters = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    adapters = list(adapters) if adapters is not None else active_adapters(denoiser)
    peft_configs = getattr(denoiser, "peft_config", None) or {}
    from_files = {}
    for adapter in adapters:
        meta = config_from_peft(peft_configs.get(adapter))
        if meta is not None:
            from_files[adapter] = meta.config
    if cfg is not None:
        for adapter, file_cfg in from_files.items():
            if (file_cfg.max_rank, file_cfg.min_rank, file_cfg.alpha) != (cfg.max_rank, cfg.min_rank, cfg.alpha):
                raise ValueError(
                    f"cfg={cfg} contradicts the T-LoRA config {file_cfg} loaded with adapter {adapter!r}; "
                    "omit cfg to use the file's config"
                )
        layouts = {c.layout for c in from_files.values()}
        if len(layouts) == 1 and cfg.layout not in layouts:  # the file knows how its ranks are encoded
            cfg = dataclasses.replace(cfg, layout=layouts.pop())
        return cfg
    missing = [a for a in adapters if a not in from_files]
    if missing or not from_files:
        raise ValueError(
            "TLoRAPatch needs cfg=TLoRAConfig(max_rank=..., min_rank=..., alpha=...): no T-LoRA config was "
            f"found for adapter(s) {missing or adapters} of {name} (files saved by tlora_diffusers carry one)"
        )
    configs = set(from_files.values())
    if len(configs) > 1:
        raise ValueError(
            f"the loaded adapters carry different T-LoRA configs {from_files}; patch them separately with adapter_names"
        )
    return configs.pop()


def _refuse_other_adapted_denoisers(pipe: Any, attr: str) -> None:
    """A second denoiser with LoRA layers (Wan's ``transformer_2``) would run unmasked."""
    for name, component in vars(pipe).items():
        if (
            name != attr
            and name.startswith(_DENOISER_ATTRS)
            and isinstance(component, nn.Module)
            and active_adapters(_unwrap(component))
        ):
            raise ValueError(
                f"pipe.{name} also carries LoRA layers, which this patch of pipe.{attr} would leave unmasked; "
                f"patch it too with TLoRAPatch(pipe.{name}, cfg) (a bare-denoiser patch) or unload its LoRA"
            )


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)  # torch.compile's OptimizedModule


class TLoRAPatch:
    """Mask a T-LoRA's ranks by each denoiser call's own timestep, on a stock pipeline.

    Attaches to ``pipe.unet`` or ``pipe.transformer`` (or a bare denoiser). For every
    denoiser call it converts that call's timestep to scheduler units (per-model
    adapter), builds the rank mask for ``T = pipe.scheduler.config.num_train_timesteps``
    and applies it to every LoRA layer of the masked adapters for that call only.
    A ``(B,)`` timestep masks each sample separately.

    Args:
        target: a diffusers pipeline, or a denoiser module.
        cfg: the rank schedule; its ``max_rank`` must equal the adapters' rank.
        adapter_names: adapters to mask; default every active adapter.
        num_train_timesteps: ``T`` for a bare denoiser (pipelines read their scheduler).
        fast: merge the active ranks into the base weights during each pipeline call
            instead of running the LoRA branch (see :mod:`tlora_diffusers.fast`); the weights
            are restored bit for bit when the call ends. Pipelines only.

    Example:
        >>> pipe.load_lora_weights("my-tlora")
        >>> with TLoRAPatch(pipe, TLoRAConfig(max_rank=64, min_rank=1)):
        ...     image = pipe("a sks dog").images[0]
    """

    def __init__(
        self,
        target: Union[nn.Module, Any],
        cfg: Optional[TLoRAConfig] = None,
        *,
        adapter_names: Optional[Sequence[str]] = None,
        num_train_timesteps: Optional[int] = None,
        fast: bool = False,
    ) -> None:
        if isinstance(target, nn.Module):
            self.pipeline = None
            self.denoiser = _unwrap(target)
            self._bare_timesteps = 1000 if num_train_timesteps is None else num_train_timesteps
            name = type(self.denoiser).__name__
        else:
            self.pipeline = target
            attr = next((a for a in _DENOISER_ATTRS if isinstance(getattr(target, a, None), nn.Module)), None)
            if attr is None:
                raise TypeError(
                    f"TLoRAPatch needs a diffusers pipeline with a `unet` or `transformer`, or a denoiser "
                    f"nn.Module; got {type(target).__name__}"
                )
            if num_train_timesteps is not None:
                raise TypeError("num_train_timesteps is read from pipe.scheduler; pass it only with a bare denoiser")
            if getattr(target, "scheduler", None) is None:
                raise ValueError(f"{type(target).__name__} has no scheduler to read num_train_timesteps from")
            self.denoiser = _unwrap(getattr(target, attr))
            self._bare_timesteps = None
            name = f"pipe.{attr}"
            _refuse_other_adapted_denoisers(target, attr)
        self.config = cfg = _resolve_config(self.denoiser, cfg, adapter_names, name)
        self._all_active = adapter_names is None
        self.num_train_timesteps  # validates a bare denoiser's T now
        adapter = get_model_adapter(self.denoiser)
        self.adapter_names, self._sites = find_mask_sites(self.denoiser, adapter_names, cfg, name)
        self.fast = bool(fast)
        if self.fast:
            if self.pipeline is None:
                raise ValueError("fast=True needs a pipeline: weights are merged for the length of one pipeline call")
            blocker = fast_path_blocker(self._sites, self.adapter_names)
            if blocker:
                raise ValueError(f"fast=True cannot be used here: {blocker}; use the mask path (fast=False)")
        self._check_not_patched()
        self._handles: list = []
        self._removed = False
        self._install(adapter)

    # -- installation -------------------------------------------------------------------
    def _check_not_patched(self) -> None:
        if self.pipeline is not None and _patch_of(self.pipeline) is not None:
            raise RuntimeError(
                f"this {type(self.pipeline).__name__} is already T-LoRA patched; call .remove() on the "
                "existing patch before patching it again"
            )
        attachment = _attachment_of(self.denoiser)
        if attachment is not None and (self.pipeline is None or any(p.pipeline is None for p in attachment.patches)):
            raise RuntimeError(
                f"this {type(self.denoiser).__name__} is already T-LoRA patched; call .remove() on the "
                "existing patch first (several pipelines sharing one denoiser may each be patched)"
            )

    def _install(self, adapter: ModelAdapter) -> None:
        attachment = _attachment_of(self.denoiser)
        try:
            if attachment is None:
                attachment = _Attachment(self.denoiser, adapter)
                self.denoiser.__dict__[_ATTACHMENT_ATTR] = attachment
            for site in self._sites:
                self._handles.append(site.module.register_forward_hook(_RankMaskHook(self, site, attachment.compiled)))
            attachment.patches.append(self)
            if self.pipeline is not None:
                vars(self.pipeline)[_PATCH_ATTR] = self
                self.pipeline.__class__ = _patched_pipeline_class(type(self.pipeline))
        except BaseException:
            self._uninstall()
            raise

    def _uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        attachment = _attachment_of(self.denoiser)
        if attachment is not None:
            attachment.patches = [p for p in attachment.patches if p is not self]
            if not attachment.patches:
                attachment.remove(self.denoiser)
                del self.denoiser.__dict__[_ATTACHMENT_ATTR]
        if self.pipeline is not None and _patch_of(self.pipeline) is self:
            del vars(self.pipeline)[_PATCH_ATTR]
            base = getattr(type(self.pipeline), "_tlora_base_class", None)
            if base is not None and type(self.pipeline) is _PATCHED_CLASSES.get(base):
                self.pipeline.__class__ = base

    # -- per call -----------------------------------------------------------------------
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
        _PIPELINE_PATCH.set(self)
        if not self._fast_allowed():
            return call(pipe, *args, **kwargs)
        attachment = _attachment_of(self.denoiser)
        with FastMerge(self, self._sites, self.denoiser) as fast:
            _FAST_RUN.set(fast)
            attachment.fast_run = fast
            try:
                return call(pipe, *args, **kwargs)
            finally:
                attachment.fast_run = None

    def _fast_allowed(self) -> bool:
        """The fast path runs only where it is safe now; otherwise this run uses the mask path."""
        if not self.fast:
            return False
        attachment = _attachment_of(self.denoiser)
        if attachment is None or len(attachment.patches) != 1:
            return False  # a shared denoiser: merged weights would leak into the other pipeline
        return fast_path_blocker(self._sites, self.adapter_names) is None

    def check(self) -> None:
        """Raise if a masked adapter was fused, unloaded or replaced since patching, or (when
        ``adapter_names`` was not given) another adapter became active.

        Runs at the start of every pipeline call, and after any denoiser call in which no
        masked layer ran: such a LoRA would otherwise run unmasked without a word.
        """
        if self._removed:
            raise RuntimeError("this TLoRAPatch was removed")
        for site in self._sites:
            reason = site.still_valid()
            if reason:
                raise RuntimeError(
                    f"T-LoRA patch can no longer mask {site.name}: {reason}; remove() this patch and patch again"
                )
        if self._all_active:
            unmasked = [a for a in active_adapters(self.denoiser) if a not in self.adapter_names]
            if unmasked:
                raise RuntimeError(
                    f"adapter(s) {unmasked} became active after patching and would run unmasked; remove() this "
                    "patch and patch again (or pass adapter_names=[...] to choose what is masked)"
                )

    # -- handle -------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """The masked layers, as ``module path (adapter name)``."""
        return [s.name for s in self._sites]

    def remove(self) -> None:
        """Detach every hook and restore the pipeline class; idempotent."""
        if not self._removed:
            self._removed = True
            self._uninstall()

    def __enter__(self) -> "TLoRAPatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._sites)} layers"
        return (
            f"TLoRAPatch({type(self.denoiser).__name__}, {self.config}, adapters={self.adapter_names}, {state})"
        )
