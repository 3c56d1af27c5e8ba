"""What a patch attaches to one denoiser: two hooks, a slot, the masked layers and their weight groups.

One :class:`Attachment` per denoiser, shared by every :class:`Binding` on it (one per patch:
pipelines made with ``from_pipe`` share denoisers). Its pre-hook finds whose call it is
(the running patched pipeline's, an unpatched sibling's, or a bare call), resolves the
call's timesteps (:mod:`~tlora_diffusers.runtime.timesteps`: the loop's exact timestep,
verified by the argument), builds that binding's masks and fills the denoiser's slot; its
post-hook (``always_call``) empties the slot, also when ``forward`` raises. Both hooks run
eagerly under ``torch.compile`` (``torch.compiler.disable``); the masked layers themselves
are plain code that compiles into the graph.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from ..backends import MaskSite, backend_of
from ..backends.peft import WeightGroup, weight_groups
from ..config import TLoRAConfig
from ..models.generic import Denoiser
from ..schedule import lora_rank_mask
from .checkpointing import unwrap_checkpointing, wrap_checkpointing
from .clock import LoopClock, components_of, pipeline_refusal
from .layer import layer_mask
from .slot import OUTPUTS, WEIGHTS, CallMasks, DenoiserSlot, mask_output
from .timesteps import CallTimesteps, ConventionGuess, as_call_shape, check_range, resolve, tolerance

__all__ = ["Attachment", "Binding", "RunState", "CURRENT_RUN", "attachment_of", "ATTACHMENT_ATTR", "warn_video"]

#: Where a patched denoiser keeps its attachment: an attribute, not a module-level weak
#: dictionary (a value pointing back at its key would keep every patched model alive).
ATTACHMENT_ATTR = "_tlora_attachment"
_WATCHING: dict[type, type] = {}
#: Distinct timesteps whose shared-timestep masks a binding keeps (a run of 1000 steps fits; oldest dropped first).
_MASK_CACHE_SIZE = 1024
#: How many frames up a call is searched for the pipeline that made it (an unpatched ``from_pipe`` sibling).
_STACK_DEPTH = 48


def _watching_class(cls: type) -> type:
    """A same-named subclass of a denoiser class whose ``load_lora_adapter`` tells the patch about hotswaps."""
    sub = _WATCHING.get(cls)
    if sub is None:

        @functools.wraps(cls.load_lora_adapter)
        def load_lora_adapter(self, *args: Any, **kwargs: Any) -> Any:
            result = cls.load_lora_adapter(self, *args, **kwargs)
            attachment = attachment_of(self)
            if attachment is not None and kwargs.get("hotswap"):
                attachment._hotswapped(kwargs.get("adapter_name"), args, kwargs)
            return result

        sub = type(cls.__name__, (cls,), {"load_lora_adapter": load_lora_adapter, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__, "_tlora_base_class": cls})
        _WATCHING[cls] = sub
    return sub


@dataclass
class RunState:
    """One pipeline run: whose patch, the loop's clock, and (off the CPU) how each denoiser's calls look."""

    patch: Any
    pipeline: Any
    clock: Optional[LoopClock]
    T: int
    uniform: dict = field(default_factory=dict)  # id(Binding) -> bool, decided at the run's first call


#: The run of the patched pipeline executing in this context, if any (set by the patched ``__call__``).
CURRENT_RUN: contextvars.ContextVar[Optional[RunState]] = contextvars.ContextVar("tlora_run", default=None)


def attachment_of(denoiser: nn.Module) -> Optional["Attachment"]:
    return denoiser.__dict__.get(ATTACHMENT_ATTR)


def _valid_T(T: Any, source: str) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"{source} must be an int >= 1, got {T!r}")
    return T


def pipeline_T(pipe: Any, infos: Any) -> int:
    """``T`` of a pipeline run: ``scheduler.config.num_train_timesteps``, else what the denoisers' families declare.

    Würstchen's prior scheduler counts ratios in [0, 1] and has no ``num_train_timesteps``; the Echo
    pipelines have no scheduler at all.
    """
    scheduler = components_of(pipe).get("scheduler")
    T = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if T is not None:
        return _valid_T(T, f"{type(scheduler).__name__}.config.num_train_timesteps")
    declared = {getattr(i.family, "num_train_timesteps", None) for i in infos}
    if len(declared) == 1 and None not in declared:
        return _valid_T(declared.pop(), "the model family's num_train_timesteps")
    what = (f"its scheduler {type(scheduler).__name__} has no num_train_timesteps" if scheduler is not None
            else "it has no scheduler")
    names = ", ".join(sorted({i.name for i in infos}))
    raise ValueError(
        f"{type(pipe).__name__}: {what}, and the model family of its denoisers ({names}) declares none, so the "
        "T of the rank schedule r(t) is unknown. Declare it: tlora_diffusers.models.register_model_family("
        "ModelFamily(name=..., denoisers=(...,), convention=..., num_train_timesteps=...), replace=True)"
    )


def _is_pipeline(obj: Any) -> bool:
    return any(c.__name__ in ("DiffusionPipeline", "ModularPipeline") for c in type(obj).__mro__)


def _calling_pipeline(denoiser: nn.Module) -> Optional[Any]:
    """The pipeline whose ``__call__`` is on the stack and holds ``denoiser`` (a ``from_pipe`` sibling), if any."""
    frame = sys._getframe(2)
    for _ in range(_STACK_DEPTH):
        if frame is None:
            return None
        if "self" in frame.f_code.co_varnames:
            obj = frame.f_locals.get("self")
            if obj is not None and _is_pipeline(obj):
                if any(getattr(v, "_orig_mod", v) is denoiser for v in vars(obj).values() if isinstance(v, nn.Module)):
                    return obj
        frame = frame.f_back
    return None


class Binding:
    """One patch on one denoiser: its adapters and their schedules, sites, timestep convention and masks."""

    def __init__(self, owner: Any, denoiser: nn.Module, info: Denoiser, configs: dict[str, TLoRAConfig],
                 sites: list[MaskSite], name: str, watch_new_adapters: bool) -> None:
        self.owner, self.denoiser, self.info, self.name = owner, denoiser, info, name
        self.configs = dict(configs)
        self.sites = sites
        self.ranks = {a: next(s.rank for s in sites if s.adapter == a) for a in self.configs}
        self.watch_new_adapters = watch_new_adapters
        self.guess = ConventionGuess(f"{name} ({info.name})", info.timestep_arg, info.convention)
        self.stale: dict[str, str] = {}  # adapter -> why it can no longer be masked (set by a hotswap)
        self._fingerprint = self._take_fingerprint()
        reps: dict[str, MaskSite] = {}
        for site in sites:
            reps.setdefault(site.adapter, site)
        self._reps = list(reps.values())  # one layer per adapter: what the O(1) staleness check looks at
        self._shared_masks: dict[tuple[float, int], dict[str, torch.Tensor]] = {}

    # -- masks ------------------------------------------------------------------------------
    def masks(self, t: torch.Tensor, T: int) -> dict[str, torch.Tensor]:
        """Each adapter's mask over its LoRA ranks (padding ranks masked) for timesteps ``t``."""
        out = {}
        for adapter, cfg in self.configs.items():
            mask = lora_rank_mask(t, cfg, T)
            pad = self.ranks[adapter] - mask.shape[-1]
            out[adapter] = torch.nn.functional.pad(mask, (0, pad)) if pad else mask
        return out

    def shared_masks(self, t: torch.Tensor, T: int) -> dict[str, torch.Tensor]:
        """:meth:`masks` of one timestep for the whole batch; on the CPU memoised by value.

        A sampling run calls the denoiser with the same few timesteps again and again (CFG
        halves, image after image): each distinct value is computed once by :meth:`masks`
        (the cached tensors are only ever read). CUDA timesteps are not read on the host.
        """
        if t.device.type != "cpu" or t.requires_grad:
            return self.masks(t, T)
        key = (float(t), T)
        hit = self._shared_masks.get(key)
        if hit is None:
            hit = self.masks(t, T)
            if len(self._shared_masks) >= _MASK_CACHE_SIZE:
                self._shared_masks.pop(next(iter(self._shared_masks)))
            self._shared_masks[key] = hit
        return hit

    # -- staleness, in microseconds ---------------------------------------------------------
    def _take_fingerprint(self) -> tuple:
        peft_config = getattr(self.denoiser, "peft_config", None)
        return id(peft_config), tuple(id(peft_config.get(a)) if peft_config else 0 for a in self.configs)

    def stale_reason(self) -> Optional[str]:
        """Why this binding can no longer mask correctly (``None`` while it can): O(adapters), no module walk.

        Catches a LoRA fused, unloaded, reloaded or hotswapped without a schedule since
        patching, and, when the patch masks every active adapter, an adapter loaded or
        activated later: each would otherwise run unmasked or by the wrong schedule.
        """
        for adapter, reason in self.stale.items():
            return f"adapter {adapter!r} {reason}"
        for site in self._reps:
            reason = site.stale_reason()
            if reason:
                return reason
            if self.watch_new_adapters:
                extra = [a for a in backend_of(site).running_adapters(site) if a not in self.configs]
                if extra:
                    return (f"adapter(s) {extra} became active after patching and would run unmasked (remove() "
                            "this patch and patch again, or pass adapter_names=[...] to choose what is masked)")
        if self._take_fingerprint() != self._fingerprint:
            return "a masked adapter was deleted or loaded again since patching; remove() this patch and patch again"
        return None

    def check(self) -> None:
        reason = self.stale_reason()
        if reason:
            raise RuntimeError(f"T-LoRA patch of {self.name} can no longer mask: {reason}")

    def adopt(self, adapter: str, cfg: Optional[TLoRAConfig], reason: str) -> None:
        """A hotswap replaced ``adapter``'s weights: mask them by ``cfg`` from now on (``None``: stale)."""
        if cfg is None:
            self.stale[adapter] = reason
            return
        self.configs[adapter] = cfg
        self._shared_masks.clear()
        self.stale.pop(adapter, None)


class Attachment:
    """The hooks, slot, masked layers and weight groups of one denoiser."""

    def __init__(self, denoiser: nn.Module, name: str, slot: Optional[DenoiserSlot] = None) -> None:
        self.denoiser, self.name = denoiser, name
        #: shared with another denoiser's attachment when the two share LoRA layers (Z-Image's ControlNet
        #: shares the transformer's refiners): each call fills it, and the shared layers read whichever runs
        self.slot = slot if slot is not None else DenoiserSlot(name)
        self.shares_layers = slot is not None
        self.bindings: list[Binding] = []
        self._installed: dict[int, tuple[MaskSite, int]] = {}
        self._hooked: dict[int, Any] = {}  # sites behind an instance-level forward (accelerate hooks)
        self.groups: list[WeightGroup] = []
        self.checkpointable = [m for m in denoiser.modules() if hasattr(m, "gradient_checkpointing")]
        self._lock = threading.Lock()
        self._weights_ok = False
        self.handles = [
            denoiser.register_forward_pre_hook(torch.compiler.disable(self._pre), with_kwargs=True),
            denoiser.register_forward_hook(torch.compiler.disable(self._post), always_call=True),
        ]
        self._base_class: Optional[type] = None
        self._watch_loader()
        denoiser.__dict__[ATTACHMENT_ATTR] = self

    # -- bindings ---------------------------------------------------------------------------
    def add(self, binding: Binding) -> None:
        with self._lock:
            try:
                for site in binding.sites:
                    self._install(site, binding)
            except BaseException:
                for site in binding.sites:
                    self._uninstall(site)
                raise
            self.bindings.append(binding)
            self._regroup()

    def discard(self, binding: Binding) -> bool:
        """Remove ``binding``; returns whether the attachment is now empty (and detached)."""
        with self._lock:
            self.bindings = [b for b in self.bindings if b is not binding]
            for site in binding.sites:
                self._uninstall(site)
            self._regroup()
            if self.bindings:
                return False
            self._detach()
            return True

    def _install(self, site: MaskSite, binding: Binding) -> None:
        key = id(site.module)
        if key in self._installed:
            known, count = self._installed[key]
            self._installed[key] = (known, count + 1)
            return
        rule = binding.info.token_layers
        tokenwise: Any = bool(rule and site.path and rule(site.path))
        if tokenwise and binding.info.frame_tokens:
            tokenwise = "frames"
        backend_of(site).install(site, self.slot, tokenwise)
        state = layer_mask(site.module)
        for arg, follows in (binding.info.layer_timesteps or {}).items():
            if state is not None and site.path and follows(site.path):
                state.group = arg
        if "forward" in site.module.__dict__:
            # accelerate's offload hooks replace forward on the instance and call the forward bound
            # when they were added, so the masked class's forward would be bypassed: a PyTorch hook
            # (run by Module.__call__ whatever forward is) applies the mask there instead.
            self._hooked[key] = site.module.register_forward_hook(_hooked_mask)
        self._installed[key] = (site, 1)

    def _uninstall(self, site: MaskSite) -> None:
        key = id(site.module)
        if key not in self._installed:
            return
        known, count = self._installed[key]
        if count > 1:
            self._installed[key] = (known, count - 1)
            return
        del self._installed[key]
        handle = self._hooked.pop(key, None)
        if handle is not None:
            handle.remove()
        backend_of(known).uninstall(known)

    def _regroup(self) -> None:
        for group in self.groups:
            group.unbind()
        sites = [s for s, _ in self._installed.values()]
        self.groups = [] if self._hooked else weight_groups(sites)
        self._weights_ok = (bool(sites) and not self._hooked and not self.shares_layers
                            and all(s.groupable for s in sites))

    def _detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        unwrap_checkpointing(self.denoiser)
        if self._base_class is not None and type(self.denoiser) is _WATCHING.get(self._base_class):
            self.denoiser.__class__ = self._base_class
        self.denoiser.__dict__.pop(ATTACHMENT_ATTR, None)

    # -- hotswap ----------------------------------------------------------------------------
    def _watch_loader(self) -> None:
        """See every ``load_lora_adapter(..., hotswap=True)`` (also through ``pipe.load_lora_weights``).

        A hotswap copies new weights into an adapter in place and never updates its
        ``peft_config``; the denoiser's class is swapped for a same-named subclass whose
        ``load_lora_adapter`` reads the new file's T-LoRA config from the metadata it carries.
        """
        cls = type(self.denoiser)
        if getattr(cls, "load_lora_adapter", None) is None:
            return
        self._base_class = cls
        self.denoiser.__class__ = _watching_class(cls)

    def _hotswapped(self, adapter: Optional[str], args: tuple, kwargs: dict) -> None:
        from ..metadata import config_after_hotswap

        bindings = [b for b in self.bindings if adapter in b.configs]
        if not bindings:
            return
        cfg, marker = config_after_hotswap(args[0] if args else kwargs.get("pretrained_model_name_or_path_or_dict"),
                                           kwargs.get("metadata"), kwargs.get("prefix", "transformer"))
        peft_config = (getattr(self.denoiser, "peft_config", None) or {}).get(adapter)
        if peft_config is not None:
            peft_config.base_model_name_or_path = marker
        for binding in bindings:
            binding.adopt(adapter, cfg, "was hotswapped with a file that carries no T-LoRA config, so its schedule is "
                          "unknown (pass the schedule with TLoRAPatch(pipe, {adapter: TLoRAConfig(...)}))")
            if cfg is not None and cfg.lora_rank > binding.ranks[adapter]:
                binding.stale[adapter] = (f"was hotswapped with a rank-{cfg.lora_rank} file, larger than the "
                                          f"{binding.ranks[adapter]} ranks its layers hold")
        with self._lock:
            self._regroup()  # weights may have been replaced (a larger rank), bind again at the next call

    # -- whose call --------------------------------------------------------------------------
    def _resolve(self) -> tuple[Binding, Optional[RunState]]:
        """The binding that masks this call and the run it belongs to (``None``: a bare call)."""
        run = CURRENT_RUN.get()
        if run is not None:
            for binding in self.bindings:
                if binding.owner is run.patch:
                    return binding, run
        pipelined = [b for b in self.bindings if b.owner.pipeline is not None]
        if not pipelined:  # a patch on the bare denoiser: calls are the user's own loop or a trainer's
            if len(self.bindings) == 1:
                return self.bindings[0], None
        sibling = _calling_pipeline(self.denoiser) if pipelined else None
        if sibling is not None:
            return self._sibling(sibling, run)
        if len(self.bindings) == 1:
            return self.bindings[0], None
        raise RuntimeError(
            f"{type(self.denoiser).__name__} carries {len(self.bindings)} T-LoRA patches (pipelines sharing it); "
            "call it through one of the patched pipelines so the call knows whose config applies"
        )

    def _sibling(self, pipe: Any, run: Optional[RunState]) -> tuple[Binding, RunState]:
        """A call from a pipeline that shares this denoiser but is not patched itself (``from_pipe``)."""
        name = type(pipe).__name__
        settled = [b for b in self.bindings if b.guess.settled is not None]
        if len(self.bindings) != 1 or not settled:
            raise RuntimeError(
                f"{name} calls {self.name}, which is T-LoRA patched through another pipeline, but this {name} is not "
                "patched itself, and the timestep convention needed to check its calls against its own loop is not "
                f"settled yet: patch this {name} too, TLoRAPatch(that_pipeline) (pipelines made with from_pipe share "
                "denoisers; each may be patched)"
            )
        refusal = pipeline_refusal(pipe)
        if refusal:
            raise ValueError(refusal)
        binding = settled[0]
        clock = LoopClock(pipe) if components_of(pipe).get("scheduler") is not None else None
        return binding, RunState(binding.owner, pipe, clock, pipeline_T(pipe, [binding.info]))

    # -- per call ---------------------------------------------------------------------------
    def _weights_allowed(self) -> bool:
        """The shared-timestep fast mode needs weights that stay where they are during the call."""
        if not self._weights_ok or "_hf_hook" in self.denoiser.__dict__:
            return False
        registry = self.denoiser.__dict__.get("_diffusers_hook")
        if registry is not None and any("offload" in name for name in getattr(registry, "hooks", {})):
            return False
        for group in self.groups:
            first = group.modules[0]
            if ("_hf_hook" in first.__dict__ or "_diffusers_hook" in first.__dict__ or first.weight.is_meta
                    or type(first.weight.data) is not torch.Tensor):
                return False  # offloaded (accelerate, diffusers' leaf-level group offloading), or a tensor subclass
        return True

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy of a patched denoiser is an unpatched one (its hooks see it is not theirs)

    def __reduce__(self):
        return (type(None), ())

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is not self.denoiser:  # a deep copy of the patched denoiser carries these hooks
            return
        binding, run = self._resolve()
        if run is None or run.pipeline is not binding.owner.pipeline:
            binding.check()  # not a patched pipeline's own run: nothing checked it at the run's start
        raw = as_call_shape(binding.info.raw_timestep(module, args, kwargs), self.name)
        fixed = binding.info.call_timestep(kwargs) if binding.info.call_timestep is not None else None
        if fixed is not None:  # the model runs this call at its own timestep (a reference pass)
            T = run.T if run is not None else binding.owner.num_train_timesteps
            call = CallTimesteps(torch.tensor(float(fixed), dtype=torch.float64, device=raw.device), True)
        elif run is None:
            T = binding.owner.num_train_timesteps
            call = resolve(raw, binding.guess, module, T, self.name, None, None)
        else:
            T = run.T
            key = id(binding)
            uniform = run.uniform.get(key)
            loop = (run.clock.now()[0], run.clock) if run.clock is not None else None  # no scheduler: the argument
            call = resolve(raw, binding.guess, module, T, self.name, loop, uniform)
            if uniform is None and raw.device.type != "cpu":
                run.uniform[key] = call.uniform
        groups = self._layer_timesteps(binding, call, kwargs, module, T) if binding.info.layer_timesteps else None
        grad = torch.is_grad_enabled()
        t = call.t
        weights = not grad and call.uniform and not groups and self._weights_allowed()
        if weights:
            masks = binding.shared_masks(t.reshape(()), T)
            masks_call = None
        elif t.ndim == 2:  # one timestep per token; other layers by the loop's (or each sample's noisiest)
            sample = binding.masks(call.sample if call.sample is not None else t.amax(dim=1), T)
            masks_call = CallMasks(sample, binding.masks(t, T), self.name, groups)
        else:
            masks_call = CallMasks(binding.masks(t.reshape(()) if call.uniform else t, T), None, self.name, groups)
        slot = self.slot
        slot.acquire()
        try:
            if weights:
                for group in self.groups:
                    if not group.valid():
                        group.bind()
                    group.apply(masks.get(group.adapter))
                slot.mode = WEIGHTS
            else:
                if grad:
                    wrap_checkpointing(self.checkpointable, slot)
                slot.call, slot.mode = masks_call, OUTPUTS
        except BaseException:
            slot.release()
            raise

    @staticmethod
    def _layer_timesteps(binding: Binding, call: Any, kwargs: dict, module: nn.Module, T: int) -> Optional[dict]:
        """Masks of the layers that follow another timestep argument, where it differs from the call's."""
        groups = {}
        for arg in binding.info.layer_timesteps:
            raw = kwargs.get(arg)
            if raw is None:
                continue  # the model uses the main timestep for them
            raw = as_call_shape(raw, f"{binding.name} ({arg})")
            convention = binding.guess.settled or binding.guess.candidates[0]
            t = check_range(convention(raw, module, T), tolerance(raw, convention, module, T), T,
                            f"{binding.name} ({arg})", convention.description)
            if call.uniform and raw.device.type == "cpu" and bool((t - call.t.to(t.device)).abs().max()
                                                                     <= tolerance(raw, convention, module, T).max()):
                continue  # the same timestep as the call's: nothing to tell apart
            groups[arg] = binding.masks(t.amax(dim=-1) if t.ndim == 2 else t, T)
        return groups or None

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module is self.denoiser:
            self.slot.release()


def _hooked_mask(module: nn.Module, args: tuple, output: Any) -> Any:
    state = layer_mask(module)
    slot = state.slot if state is not None else None
    if slot is None or slot.mode is None:
        return None
    if slot.mode is WEIGHTS:  # never chosen while a site is hooked; kept exact anyway
        raise RuntimeError(f"{state.name}: a hooked T-LoRA layer cannot run in weights mode")
    return mask_output(module, output)


def warn_video(info: Denoiser) -> None:
    if info.video:
        warnings.warn(
            f"{info.name}: T-LoRA masks on temporally compressed video latents are experimental (as SimpleTuner's "
            "documentation says): each latent frame mixes several video frames",
            UserWarning, stacklevel=3,
        )
