"""Which schedule does this adapter have: the T-LoRA metadata of files and of loaded adapters.

One place answers it for the patch, the loaders and the writers:

* files carry versioned JSON under the ``tlora_config`` safetensors metadata key
  (:class:`TLoRAFileMetadata`: the schedule, variant, provenance and a weights fingerprint);
* after a stock ``load_lora_weights`` that JSON survives in the adapter's PEFT
  ``LoraConfig.base_model_name_or_path`` (an informational field diffusers never reads),
  behind the :data:`PEFT_MARKER` prefix;
* a stock hotswap replaces an adapter's weights without touching that field, so the
  fingerprint (a few ``lora_A`` values) tells whether the weights are still the file's;
* :func:`adapter_schedules` resolves each adapter's schedule from a caller's config and
  what its file carried, refusing contradictions and schedules whose weights are gone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .config import TLoRAConfig

__all__ = [
    "TLORA_METADATA_KEY", "FILE_FORMAT_VERSION", "READABLE_VERSIONS", "VARIANTS", "COMPONENT_PREFIXES", "WEIGHT_NAME",
    "PEFT_MARKER", "TLoRAFileMetadata", "json_object", "read_safetensors_metadata", "read_tlora_metadata",
    "peft_metadata", "config_from_peft", "weights_fingerprint", "fingerprint_matches", "config_after_hotswap",
    "adapter_schedules", "ss_mirror",
]

TLORA_METADATA_KEY = "tlora_config"
#: Key prefixes of diffusers LoRA files (``unet_name`` / ``transformer_name`` of its loaders).
COMPONENT_PREFIXES = ("unet", "transformer")
#: diffusers' default LoRA weight file name (``diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE``).
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FILE_FORMAT_VERSION = 2
#: Versions this release reads (1: no weights fingerprint).
READABLE_VERSIONS = (1, 2)
VARIANTS = ("vanilla", "ortho")
#: Prefix of the metadata JSON mirrored into ``LoraConfig.base_model_name_or_path``.
PEFT_MARKER = "tlora_diffusers:"
_PEFT_MARKER = PEFT_MARKER
#: Metadata larger than this is refused before parsing (safetensors headers are small).
MAX_METADATA_BYTES = 1 << 20


def json_object(text: Any, where: str, what: str) -> dict[str, Any]:
    """Parse ``text`` as a JSON object; errors name the file (``where``) and the entry (``what``)."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {what} must be a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class TLoRAFileMetadata:
    """What a T-LoRA file says about itself (the ``tlora_config`` metadata entry)."""

    config: TLoRAConfig
    variant: str = "vanilla"
    base_model: Optional[str] = None
    component: str = "unet"
    target_modules: tuple[str, ...] = field(default_factory=tuple)
    source_format: Optional[str] = None
    #: A few ``lora_A`` values per sampled module (``weights_fingerprint``); empty for version-1 files.
    fingerprint: Mapping[str, tuple[float, ...]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.component not in COMPONENT_PREFIXES:
            raise ValueError(f"component must be one of {COMPONENT_PREFIXES} (the key prefix of diffusers LoRA files), "
                             f"got {self.component!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        fingerprint = self.fingerprint or {}
        if not isinstance(fingerprint, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v)
            for k, v in fingerprint.items()
        ):
            raise ValueError(f"fingerprint must map module names to lists of numbers, got {fingerprint!r}")
        object.__setattr__(self, "fingerprint", {k: tuple(float(x) for x in v) for k, v in fingerprint.items()})

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": FILE_FORMAT_VERSION,
                **{k: v for k, v in self.config.to_dict().items() if k != "format_version"},
                "variant": self.variant,
                "base_model": self.base_model,
                "component": self.component,
                "target_modules": list(self.target_modules),
                "source_format": self.source_format,
                "fingerprint": {k: list(v) for k, v in self.fingerprint.items()},
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, where: str = "metadata") -> "TLoRAFileMetadata":
        data = json_object(text, where, f"'{TLORA_METADATA_KEY}'")
        version = data.pop("format_version", None)
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{where}: T-LoRA file format_version must be one of {READABLE_VERSIONS}, got {version!r}; "
                "upgrade tlora_diffusers to read it"
            )
        try:
            config = TLoRAConfig.from_dict({k: data.pop(k) for k in ("max_rank", "min_rank", "alpha", "layout") if k in data})
            targets = data.pop("target_modules", [])
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise ValueError(f"target_modules must be a list of strings, got {targets!r}")
            for key in ("base_model", "source_format"):
                if data.get(key) is not None and not isinstance(data[key], str):
                    raise ValueError(f"{key} must be a string, got {data[key]!r}")
            allowed = {"variant", "base_model", "component", "source_format", "fingerprint"}
            unknown = sorted(set(data) - allowed)
            if unknown:
                raise ValueError(f"unknown keys {unknown}")
            return cls(config=config, target_modules=tuple(targets), **data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: invalid '{TLORA_METADATA_KEY}': {e}") from None



def peft_metadata(lora_config: Mapping[str, Any], meta: TLoRAFileMetadata) -> dict[str, Any]:
    """A JSON-ready ``LoraConfig`` dict carrying the T-LoRA config in ``base_model_name_or_path``."""
    out = {}
    for key, value in dict(lora_config).items():
        out[key] = sorted(value) if isinstance(value, (set, frozenset)) else value
    out["base_model_name_or_path"] = _PEFT_MARKER + meta.to_json()
    return out


def read_safetensors_metadata(path: Union[str, Path]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, with clear errors for files that are not one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    total = sum(len(k) + len(v) for k, v in metadata.items())
    if total > MAX_METADATA_BYTES:
        raise ValueError(f"{path}: metadata is {total} bytes, more than the {MAX_METADATA_BYTES} allowed")
    return metadata


def read_tlora_metadata(path: Union[str, Path]) -> Optional[TLoRAFileMetadata]:
    """The T-LoRA metadata of one of our files, ``None`` for a plain LoRA file."""
    metadata = read_safetensors_metadata(path)
    if TLORA_METADATA_KEY not in metadata:
        return None
    return TLoRAFileMetadata.from_json(metadata[TLORA_METADATA_KEY], where=str(path))


def config_from_peft(peft_config: Any) -> Optional[TLoRAFileMetadata]:
    """The T-LoRA metadata mirrored into a loaded adapter's ``LoraConfig``, if any."""
    marker = getattr(peft_config, "base_model_name_or_path", None)
    if not isinstance(marker, str) or not marker.startswith(_PEFT_MARKER):
        return None
    return TLoRAFileMetadata.from_json(marker[len(_PEFT_MARKER):], where="adapter config")


#: How many ``lora_A`` tensors, and values of each, a fingerprint samples.
_FINGERPRINT_MODULES, _FINGERPRINT_VALUES = 4, 8


def _strip(key: str) -> str:
    return key.split(".", 1)[1] if key.split(".", 1)[0] in COMPONENT_PREFIXES else key


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, ...]]:
    """The first values of a few evenly spaced ``lora_A`` tensors, by module path (no adapter name)."""
    keys = sorted(k for k in state_dict if k.endswith(".lora_A.weight"))
    if not keys:
        return {}
    step = max(1, len(keys) // _FINGERPRINT_MODULES)
    out = {}
    for key in keys[::step][:_FINGERPRINT_MODULES]:
        values = state_dict[key].detach().reshape(-1)[:_FINGERPRINT_VALUES].double().cpu().tolist()
        out[_strip(key)[: -len(".lora_A.weight")]] = tuple(values)
    return out


def fingerprint_matches(denoiser: Any, adapter: str, meta: "TLoRAFileMetadata") -> bool:
    """Whether ``adapter``'s live ``lora_A`` weights are still those the metadata was saved with.

    Tolerates a cast to half precision (values within 1 %); a hotswapped adapter's weights differ.
    """
    for module_path, expected in meta.fingerprint.items():
        try:
            layer = denoiser.get_submodule(module_path)
            weight = layer.lora_A[adapter].weight
        except (AttributeError, KeyError):
            return False
        if weight.is_meta:
            continue  # offloaded: nothing to compare without loading it
        live = weight.detach().reshape(-1)[: len(expected)].double().cpu()
        ref = torch.tensor(expected, dtype=torch.float64)
        scale = ref.abs().max().clamp_min(1e-12)
        if live.shape != ref.shape or bool(((live - ref).abs() > 1e-2 * ref.abs() + 1e-4 * scale).any()):
            return False
    return True


def config_after_hotswap(source: Any, metadata: Optional[Mapping[str, Any]],
                         prefix: Optional[str]) -> tuple[Optional[TLoRAConfig], Optional[str]]:
    """The schedule (and the ``base_model_name_or_path`` marker) of a file hotswapped into an adapter.

    ``metadata`` is what diffusers passed ``load_lora_adapter`` (the file's adapter
    metadata, keys prefixed by the component); without it a path's safetensors header is read.
    """
    marker = None
    if metadata:
        keys = {k.removeprefix(f"{prefix}.") if prefix else k: v for k, v in metadata.items()}
        marker = keys.get("base_model_name_or_path")
    elif isinstance(source, (str, Path)):
        path = Path(source)
        path = path / WEIGHT_NAME if path.is_dir() else path
        if path.is_file() and path.suffix == ".safetensors":
            raw = read_safetensors_metadata(path)
            if TLORA_METADATA_KEY in raw:
                marker = _PEFT_MARKER + TLoRAFileMetadata.from_json(raw[TLORA_METADATA_KEY], where=str(path)).to_json()
    if not isinstance(marker, str) or not marker.startswith(_PEFT_MARKER):
        return None, None
    return TLoRAFileMetadata.from_json(marker[len(_PEFT_MARKER):], where="hotswapped file").config, marker


def _file_schedules(denoiser: Any, adapters: Sequence[str], name: str,
                    explicit: Mapping[str, TLoRAConfig]) -> dict[str, TLoRAConfig]:
    """The T-LoRA configs that loaded files carry, for adapters whose weights are still those files'.

    A config whose weights were hotswapped away is an error unless ``explicit`` gives the adapter's schedule.
    """
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


def adapter_schedules(denoiser: Any, adapters: Sequence[str], cfg: Union[None, TLoRAConfig, Mapping[str, TLoRAConfig]],
                      name: str, selected: bool) -> dict[str, TLoRAConfig]:
    """Each adapter's schedule: from ``cfg`` (one for all, or per adapter) or from its file; contradictions are errors."""
    explicit = dict(cfg) if isinstance(cfg, Mapping) else {a: cfg for a in adapters} if cfg is not None else {}
    from_files = _file_schedules(denoiser, adapters, name, explicit)
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


def ss_mirror(meta: "TLoRAFileMetadata", lora_config: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    """The kohya-side keys of a schedule, as the sd-scripts T-LoRA fork and Fizgig write and read them.

    ``ss_network_module``/``ss_network_dim``/``ss_network_alpha`` and ``ss_tlora_min_rank``,
    ``ss_tlora_alpha_rank_scale`` (the exponent), ``ss_tlora_max_timestep`` (1000: scheduler units),
    ``ss_tlora_init`` (kaiming: vanilla; orthogonal: ortho keys), ``ss_adapter="tlora"`` (Fizgig's marker).
    Our ``tlora_config`` stays the source of truth; these say the same for tools that read only them.
    """
    cfg = meta.config
    lora_alpha = (lora_config or {}).get("lora_alpha", cfg.lora_rank)
    return {
        "ss_network_module": "networks.lora_tlora", "ss_network_dim": str(cfg.max_rank),
        "ss_network_alpha": str(float(cfg.max_rank if cfg.layout == "paired" else lora_alpha)),
        "ss_tlora_min_rank": str(cfg.min_rank), "ss_tlora_alpha_rank_scale": str(float(cfg.alpha)),
        "ss_tlora_max_timestep": "1000", "ss_tlora_init": "orthogonal" if cfg.layout == "paired" else "kaiming",
        "ss_tlora_sig_type": "last", "ss_adapter": "tlora",
    }
