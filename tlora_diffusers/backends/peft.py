"""PEFT LoRA layers (what ``load_lora_weights`` and ``add_adapter`` create).

PEFT computes ``lora_B(lora_A(dropout(x))) * scaling``; the rank bottleneck is
``lora_A[adapter]``. Patching swaps that module's class for a subclass whose ``forward``
reads the denoiser's :class:`~tlora_diffusers.runtime.slot.DenoiserSlot` (``state_dict`` keys,
parameters and PEFT's own ``forward`` stay untouched):

* in ``WEIGHTS`` mode it multiplies by its weight masked for the call, a view into one
  buffer per :class:`WeightGroup` of equally shaped ``lora_A`` weights, masked by a single
  ``torch.mul`` per group: the host cost per call does not grow with the layer count;
* in ``OUTPUTS`` mode it multiplies its output by the call's per-sample/per-token mask.

While a group is bound its parameters are views of one storage; ``state_dict()`` returns
independent copies (a post-hook), so ``save_lora_weights`` and safetensors work as usual.
"""

from __future__ import annotations

import copyreg
import warnings
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TLoRAConfig
from ..runtime.layer import LAYER_ATTR, LayerMask
from ..runtime.slot import OUTPUTS, WEIGHTS, mask_output
from . import MaskSite

__all__ = ["PeftBackend", "WeightGroup", "lora_layers", "masked_classes"]


class TLoRALinear(nn.Linear):
    """A PEFT ``lora_A`` Linear that applies the call's T-LoRA mask (see the module docstring)."""

    # The parameters are read from ``_parameters`` (one dict lookup) instead of ``self.weight``
    # (``nn.Module.__getattr__``, a Python call): this runs once per adapted layer per call.
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        state = self.__dict__.get(LAYER_ATTR)  # None: a forward bound before remove() (offload hooks)
        mode = state.slot.mode if state is not None else None
        params = self._parameters
        if mode is WEIGHTS:
            return F.linear(input, state.masked, params["bias"])
        out = F.linear(input, params["weight"], params["bias"])
        return out if mode is not OUTPUTS else mask_output(self, out)

    def __reduce_ex__(self, protocol: int) -> Any:
        return _plain_reduce(self, protocol)


def _conv_class(base: type) -> type:
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        state = self.__dict__.get(LAYER_ATTR)
        mode = state.slot.mode if state is not None else None
        params = self._parameters
        if mode is WEIGHTS:
            return self._conv_forward(input, state.masked, params["bias"])
        out = self._conv_forward(input, params["weight"], params["bias"])
        return out if mode is not OUTPUTS else mask_output(self, out)

    name = f"TLoRA{base.__name__}"
    return type(name, (base,), {"forward": forward, "__reduce_ex__": lambda self, p: _plain_reduce(self, p),
                                "__module__": __name__, "__qualname__": name,
                                "__doc__": f"A PEFT ``lora_A`` {base.__name__} that applies the call's T-LoRA mask."})


TLoRAConv1d, TLoRAConv2d, TLoRAConv3d = (_conv_class(c) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d))
#: Masking subclass of each ``lora_A`` type, and back.
_MASKED = {nn.Linear: TLoRALinear, nn.Conv1d: TLoRAConv1d, nn.Conv2d: TLoRAConv2d, nn.Conv3d: TLoRAConv3d}
_PLAIN = {v: k for k, v in _MASKED.items()}
#: Rank dimension of each ``lora_A`` type's output.
_RANK_DIM = {nn.Linear: -1, nn.Conv1d: 1, nn.Conv2d: 1, nn.Conv3d: 1}


def masked_classes() -> tuple[type, ...]:
    return tuple(_PLAIN)


def _plain_state(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in module.__dict__.items() if k != LAYER_ATTR}


def _plain_reduce(module: nn.Module, protocol: int) -> Any:
    """Pickling or deep-copying a patched layer gives the plain PEFT layer (no slot, no masking)."""
    return copyreg.__newobj__, (_PLAIN[type(module)],), _plain_state(module)


def lora_layers(denoiser: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    for name, module in denoiser.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _unmaskable(layer: nn.Module, adapter: str, after: bool = False) -> Optional[str]:
    if adapter in getattr(layer, "merged_adapters", ()):
        return (
            "the LoRA is fused into the base weights (fuse_lora/merge_adapter); masked ranks cannot be "
            "removed from fused weights: call pipe.unfuse_lora() "
            + ("to mask it again" if after else "before patching")
        )
    if getattr(layer, "use_dora", {}).get(adapter, False):
        return "DoRA adapters are not supported: the magnitude vector depends on all ranks at once"
    if adapter in getattr(layer, "lora_variant", {}):
        variant = type(layer.lora_variant[adapter]).__name__
        return f"LoRA variant {variant} is not supported; only plain LoRA layers can be rank-masked"
    return None


class PeftBackend:
    name = "peft"

    def active_adapters(self, denoiser: nn.Module) -> list[str]:
        names: dict[str, None] = {}
        for _, layer in lora_layers(denoiser):
            if getattr(layer, "disable_adapters", False):
                continue
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A or adapter in layer.lora_embedding_A:
                    names[adapter] = None
        return list(names)

    def loaded_adapters(self, denoiser: nn.Module) -> list[str]:
        names: dict[str, None] = {}
        for _, layer in lora_layers(denoiser):
            names.update(dict.fromkeys(list(layer.lora_A) + list(layer.lora_embedding_A)))
        return list(names)

    def mask_sites(self, denoiser: nn.Module, adapters: Sequence[str]) -> list[MaskSite]:
        sites = []
        for path, layer in lora_layers(denoiser):
            parent_path, _, attr = path.rpartition(".")
            parent = denoiser.get_submodule(parent_path) if parent_path else denoiser
            for adapter in adapters:
                site = self._site(path, layer, adapter, parent, attr)
                if site is not None:
                    sites.append(site)
        return sites

    def _site(self, path: str, layer: nn.Module, adapter: str, parent: nn.Module, attr: str) -> Optional[MaskSite]:
        where = f"{path} (adapter {adapter!r})"
        if adapter in layer.lora_A and type(layer).__name__ == "ParamWrapper":
            raise ValueError(
                f"cannot mask {where}: the adapter targets the parameter {layer.parameter_name!r} "
                "(LoraConfig.target_parameters), so PEFT adds lora_B @ lora_A to the weight inside the module and no "
                "rank bottleneck runs where a mask could act. Load it with target_modules (the layer's module) instead"
            )
        if adapter in layer.lora_embedding_A:
            raise ValueError(f"cannot mask {where}: T-LoRA masking supports Linear and Conv layers, not Embedding")
        if adapter not in layer.lora_A:
            return None
        reason = _unmaskable(layer, adapter)
        if reason:
            raise ValueError(f"cannot mask {where}: {reason}")
        lora_a = layer.lora_A[adapter]
        plain = _PLAIN.get(type(lora_a), type(lora_a))
        if plain not in _RANK_DIM:
            raise ValueError(
                f"cannot mask {where}: its lora_A is a {type(lora_a).__name__}; supported: Linear, Conv1d, Conv2d, Conv3d"
            )

        def stale_reason() -> Optional[str]:
            if parent._modules.get(attr) is not layer:
                return (f"the LoRA layer at {path} was unloaded or replaced (e.g. unload_lora_weights); remove() this "
                        "patch and patch again")
            if layer.lora_A._modules.get(adapter) is not lora_a:
                return f"adapter {adapter!r} was deleted or replaced at {path}; remove() this patch and patch again"
            return _unmaskable(layer, adapter, after=True)

        return MaskSite(where, adapter, lora_a, _RANK_DIM[plain], int(lora_a.weight.shape[0]), stale_reason,
                        layer=layer, path=path, groupable=True)

    def running_adapters(self, site: MaskSite) -> list[str]:
        layer = site.layer
        if layer is None or getattr(layer, "disable_adapters", False):
            return []
        return list(layer.active_adapters)

    def check_schedules(self, sites: Sequence[MaskSite], configs: Mapping[str, TLoRAConfig], where: str) -> None:
        """PEFT's ``lora_bias`` adds ``lora_B``'s bias after the rank bottleneck: no mask reaches it."""
        for adapter, cfg in configs.items():
            biased = [s for s in sites if s.adapter == adapter and s.layer is not None
                      and getattr(s.layer, "lora_bias", {}).get(adapter, False)]
            if biased and cfg.min_rank == 0:
                warnings.warn(
                    f"adapter {adapter!r} of {where} has lora_bias=True: lora_B's bias is added at every step whatever "
                    "the mask, so with min_rank=0 the adapter is not fully off at t=T (its bias still applies)",
                    UserWarning, stacklevel=5,
                )

    # -- installing -------------------------------------------------------------------------
    def install(self, site: MaskSite, slot: Any, tokenwise: bool) -> None:
        module = site.module
        if type(module) in _PLAIN:  # another denoiser sharing this layer already masks it, with the same slot
            state = module.__dict__[LAYER_ATTR]
            if state.slot is not slot:
                raise ValueError(f"{site.name} is already masked through another denoiser's slot")
            state.users += 1
            return
        state = LayerMask(slot, site.adapter, site.rank_dim, tokenwise, site.name)
        state.handles.append(module.register_state_dict_post_hook(_independent_state))
        module.__dict__[LAYER_ATTR] = state
        module.__class__ = _MASKED[type(module)]

    def uninstall(self, site: MaskSite) -> None:
        module = site.module
        if type(module) not in _PLAIN:
            return
        state = module.__dict__[LAYER_ATTR]
        state.users -= 1
        if state.users > 0:
            return
        del module.__dict__[LAYER_ATTR]
        for handle in state.handles:
            handle.remove()
        module.__class__ = _PLAIN[type(module)]


def _independent_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """``state_dict`` entries of a bound weight get their own storage (safetensors refuses shared ones)."""
    state = module.__dict__.get(LAYER_ATTR)
    if state is not None and state.masked is not None:
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = state_dict[key].clone()


class WeightGroup:
    """Equally shaped ``lora_A`` weights of one adapter, stored in one buffer and masked with one op.

    ``bind()`` makes each parameter a view of ``storage`` (values unchanged) and gives each
    module a view of ``masked``; ``apply(mask)`` writes ``storage * mask`` into ``masked``.
    ``valid()`` checks, in O(1), that the parameters still are those views (``module.to()``
    or a cast replaces parameter data; the attachment then binds again).
    """

    __slots__ = ("adapter", "modules", "storage", "masked", "_ptrs")

    def __init__(self, adapter: str, modules: list[nn.Module]) -> None:
        self.adapter, self.modules = adapter, modules
        self.storage: Optional[torch.Tensor] = None
        self.masked: Optional[torch.Tensor] = None
        self._ptrs: tuple[int, int] = (0, 0)

    @torch.no_grad()
    def bind(self) -> None:
        params = [m.weight for m in self.modules]
        self.storage = _aligned_like(params)
        self.storage.copy_(torch.stack([p.detach() for p in params]))
        for param, view in zip(params, self.storage):
            param.data = view
        self.masked = _aligned_like(params)
        self.masked.copy_(self.storage)
        for module, view in zip(self.modules, self.masked):
            module.__dict__[LAYER_ATTR].masked = view
        self._ptrs = (params[0].data_ptr(), params[-1].data_ptr())

    def valid(self) -> bool:
        if self.storage is None:
            return False
        first, last = self.modules[0].weight, self.modules[-1].weight
        return (first.data_ptr(), last.data_ptr()) == self._ptrs and first.shape == self.storage.shape[1:]

    @torch.no_grad()
    def unbind(self) -> None:
        if self.storage is not None:
            for module in self.modules:
                if module.weight.untyped_storage().data_ptr() == self.storage.untyped_storage().data_ptr():
                    module.weight.data = module.weight.data.clone()
                state = module.__dict__.get(LAYER_ATTR)
                if state is not None:
                    state.masked = None
        self.storage = self.masked = None

    @torch.no_grad()
    def apply(self, mask: Optional[torch.Tensor]) -> None:
        """``masked = storage * mask`` along the rank dim (``None``: unmasked copy)."""
        if mask is None:
            self.masked.copy_(self.storage)
            return
        shape = [1] * self.storage.ndim
        shape[1] = mask.shape[-1]
        torch.mul(self.storage, mask.to(device=self.storage.device, dtype=self.storage.dtype, non_blocking=True)
                  .reshape(shape), out=self.masked)


#: Each weight in a group buffer starts on a 64-byte boundary, as a freshly allocated tensor does:
#: CPU GEMM kernels pick their SIMD path by alignment, so an unaligned view would round differently.
_ALIGN_BYTES = 64


def _aligned_like(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """An ``(n, *shape)`` buffer whose ``n`` slices each start 64-byte aligned (rows padded, padding unused)."""
    first = params[0]
    numel = first.numel()
    per = max(1, _ALIGN_BYTES // first.element_size())
    padded = -(-numel // per) * per
    flat = torch.empty(len(params), padded, dtype=first.dtype, device=first.device)
    return flat[:, :numel].view(len(params), *first.shape)


def weight_groups(sites: Sequence[MaskSite]) -> list[WeightGroup]:
    """Group groupable sites by (adapter, device, dtype, weight shape)."""
    groups: dict[tuple, list[nn.Module]] = {}
    for site in sites:
        if not site.groupable:
            continue
        w = site.module.weight
        groups.setdefault((site.adapter, w.device, w.dtype, tuple(w.shape)), []).append(site.module)
    return [WeightGroup(key[0], modules) for key, modules in groups.items()]
