"""kohya-style T-LoRAs: the sd-scripts T-LoRA fork, Fizgig, and our own kohya exports.

Keys are ``lora_unet_<module>`` / ``lora_transformer_<module>`` (dots as underscores) with

* vanilla: ``.lora_down.weight`` ``(r, in)``, ``.lora_up.weight`` ``(out, r)``, ``.alpha`` (scale ``alpha / r``);
* ortho (the sd-scripts fork, ``networks/lora_tlora.py`` at orangemagic123/sd-scripts@cb1be1c, lines 143-325):
  ``.q_layer.weight``, ``.p_layer.weight``, ``.lambda_layer``, and the frozen base ``.base_q.weight``,
  ``.base_p.weight``, ``.base_lambda_buf``, plus ``.alpha``; the delta is
  ``alpha / r · (P·diag(λ)·Q − P₀·diag(λ₀)·Q₀)`` with the first ``r(t)`` components of both kept, so the
  conversion to our exact paired encoding (:func:`tlora_diffusers.ortho.paired_lora_factors`) is exact.

The schedule is in the metadata: ours (``tlora_config``, exact), or the fork's ``ss_tlora_min_rank``,
``ss_tlora_alpha_rank_scale``, ``ss_tlora_max_timestep`` with ``ss_network_dim`` (the schedule's max rank;
``networks/lora_tlora.py:555-583``), or Fizgig's ``ss_adapter="tlora"`` with ``ss_tlora_min_rank`` (linear,
``networks/lora.py::tlora_rank_mask`` at tachytelicdetonation/Fizgig@0cdfbed). A kohya file whose
metadata says nothing of a T-LoRA is an ordinary LoRA: it needs the schedule from the caller.

Module names go through diffusers' own converters where they exist: SD/SDXL UNets (LDM/SGM block
names included) through ``lora_state_dict`` and ``convert_unet_state_dict_to_peft``; Anima and Krea 2
native names through ``_convert_non_diffusers_{anima,krea2}_lora_to_diffusers``; otherwise by matching the
underscored name against the denoiser's own module paths. Text-encoder layers (``lora_te*``) are not
masked by a T-LoRA: such a file is refused here with the stock way to load it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import TLoRAConfig
from ..metadata import TLORA_METADATA_KEY, TLoRAFileMetadata
from ..ortho import paired_lora_factors
from .common import NeedsInputError, check_denoiser, schedule_config
from .formats import ConvertedTLoRA, TLoRAFormat

__all__ = ["FORMAT", "kohya_schedule", "SS_MODULES", "VANILLA", "ORTHO", "PREFIXES"]

VANILLA = ("lora_down.weight", "lora_up.weight")
ORTHO = ("q_layer.weight", "p_layer.weight", "lambda_layer", "base_q.weight", "base_p.weight", "base_lambda_buf")
PREFIXES = ("lora_unet_", "lora_transformer_")
_TEXT = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
#: ``ss_network_module`` values of T-LoRA trainers.
SS_MODULES = ("networks.lora_tlora", "networks.lora_tlora_anima")
_KEY = re.compile(r"^(?P<name>lora_[a-z0-9]+_[^.]+)\.(?P<param>" + "|".join(re.escape(p) for p in VANILLA + ORTHO)
                  + r"|alpha)$")


def _is_kohya(keys: list[str], metadata: dict[str, str]) -> bool:
    return bool(keys) and all(_KEY.match(k) for k in keys) and any(k.startswith(PREFIXES + _TEXT) for k in keys)


def _number(metadata: dict[str, str], key: str, kind: type, path: Path) -> Any:
    value = metadata.get(key)
    if value in (None, "", "None"):
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except ValueError:
        raise ValueError(f"{path}: metadata {key}={value!r} is not a number") from None


def kohya_schedule(metadata: dict[str, str], rank: int, path: Path) -> tuple[Optional[TLoRAConfig], Optional[str]]:
    """The schedule a kohya file's metadata declares, and who wrote it; ``(None, None)`` for an ordinary LoRA."""
    if TLORA_METADATA_KEY in metadata:
        meta = TLoRAFileMetadata.from_json(metadata[TLORA_METADATA_KEY], where=str(path))
        return meta.config, "tlora_diffusers"
    module = metadata.get("ss_network_module", "")
    fork = module in SS_MODULES or any(k.startswith("ss_tlora_") for k in metadata)
    fizgig = metadata.get("ss_adapter") == "tlora"
    if not (fork or fizgig):
        return None, None
    dim = _number(metadata, "ss_network_dim", int, path) or rank
    if dim != rank:
        raise ValueError(f"{path}: ss_network_dim={dim} (the schedule's max rank) but the layers have rank {rank}; "
                         "a T-LoRA masks the layers' own ranks")
    min_rank = _number(metadata, "ss_tlora_min_rank", int, path)
    exponent = _number(metadata, "ss_tlora_alpha_rank_scale", float, path)
    T = _number(metadata, "ss_tlora_max_timestep", float, path)
    if T is not None and T not in (1.0, 1000.0):
        raise ValueError(f"{path}: ss_tlora_max_timestep={T}: only 1000 (scheduler units) and 1.0 (flow time, "
                         "Anima) are known; the masks depend on t / T, so other values need the file's trainer")
    try:
        cfg = TLoRAConfig(rank, 1 if min_rank is None else min_rank, 1.0 if exponent is None else exponent)
    except ValueError as e:
        raise ValueError(f"{path}: metadata ss_tlora_*: {e}") from None
    return cfg, ("fizgig" if fizgig and module not in SS_MODULES else "sd-scripts-tlora")


# -- module names ---------------------------------------------------------------------------------

_ANIMA = re.compile(r"^blocks_(\d+)_(self_attn|cross_attn)_(q_proj|k_proj|v_proj|output_proj)$|"
                    r"^blocks_(\d+)_mlp_(layer1|layer2)$")
_KREA2 = re.compile(r"^(blocks_\d+_(?:attn|mlp)|txtfusion_(?:layerwise|refiner)_blocks_\d+_(?:attn|mlp))_([a-z0-9]+)$|"
                    r"^(txtfusion_projector|first|last_linear|tmlp_[02]|tproj_1|txtmlp_[13])$")


def _native_dotted(stem: str, kind: str) -> Optional[str]:
    """An underscored native module name back to its dotted form (Anima, Krea 2), or ``None``."""
    if kind == "anima":
        m = _ANIMA.match(stem)
        if not m:
            return None
        return f"blocks.{m[1]}.{m[2]}.{m[3]}" if m[1] is not None else f"blocks.{m[4]}.mlp.{m[5]}"
    m = _KREA2.match(stem)
    if not m:
        return None
    if m[3] is not None:
        return {"txtfusion_projector": "txtfusion.projector", "first": "first", "last_linear": "last.linear",
                "tmlp_0": "tmlp.0", "tmlp_2": "tmlp.2", "tproj_1": "tproj.1", "txtmlp_1": "txtmlp.1",
                "txtmlp_3": "txtmlp.3"}[m[3]]
    block = re.sub(r"^txtfusion_(layerwise|refiner)_blocks_(\d+)", r"txtfusion.\1_blocks.\2", m[1])
    block = re.sub(r"^blocks_(\d+)", r"blocks.\1", block).replace("_attn", ".attn").replace("_mlp", ".mlp")
    return f"{block}.{m[2]}"


def _through_diffusers_native(stems: list[str], kind: str) -> dict[str, str]:
    """Native names -> diffusers module paths with diffusers' own converter for that model."""
    from diffusers.loaders import lora_conversion_utils as conv

    convert = {"anima": conv._convert_non_diffusers_anima_lora_to_diffusers,
               "krea2": conv._convert_non_diffusers_krea2_lora_to_diffusers}[kind]
    out = {}
    for stem in stems:
        dotted = _native_dotted(stem, kind)
        if dotted is None:
            continue
        fake = {f"diffusion_model.{dotted}.lora_A.weight": torch.zeros(1, 1),
                f"diffusion_model.{dotted}.lora_B.weight": torch.zeros(1, 1)}
        converted = convert(fake)
        key = next(k for k in converted if k.endswith(".lora_A.weight"))
        out[stem] = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
    return out


def _through_diffusers_unet(names: list[str], denoiser: Optional[nn.Module]) -> dict[str, str]:
    """``lora_unet_*`` names -> UNet module paths, as ``StableDiffusionXLPipeline.lora_state_dict`` maps them."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    config = getattr(denoiser, "config", None)
    fake = {}
    for i, name in enumerate(names):  # each name's tensors carry its index: the converter renames, not reorders
        fake[f"{name}.lora_down.weight"] = torch.full((1, 1), float(i))
        fake[f"{name}.lora_up.weight"] = torch.full((1, 1), float(i))
    try:
        converted, _ = StableDiffusionXLPipeline.lora_state_dict(fake, unet_config=config)
    except Exception:  # names diffusers does not know: left for the error that lists them
        return {}
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    out: dict[str, str] = {}
    for key, value in peft.items():
        if key.endswith(".lora_A.weight") and value.numel() == 1:
            out.setdefault(names[int(value.item())], key.removesuffix(".lora_A.weight"))
    return out


def module_paths(names: list[str], denoiser: Optional[nn.Module], path: Path) -> dict[str, str]:
    """Each kohya module name -> the denoiser's module path (see the module docstring); every name placed."""
    stems = {n: n.split("_", 2)[2] if n.startswith("lora_transformer_") else n.removeprefix("lora_unet_")
             for n in names}
    out: dict[str, str] = {}
    modules = dict(denoiser.named_modules()) if denoiser is not None else {}
    flat = {p.replace(".", "_"): p for p in modules}
    for name, stem in stems.items():
        if stem in flat:
            out[name] = flat[stem]
    rest = [n for n in names if n not in out]
    cls = type(denoiser).__name__ if denoiser is not None else ""
    if rest and (denoiser is None or "UNet" in cls):
        unet = _through_diffusers_unet([n for n in rest if n.startswith("lora_unet_")], denoiser)
        out.update({n: p for n, p in unet.items() if denoiser is None or p in modules})
    kinds = [k for k, c in (("anima", "CosmosTransformer3DModel"), ("krea2", "Krea2Transformer2DModel")) if c == cls]
    for kind in kinds:
        rest = [n for n in names if n not in out]
        native = _through_diffusers_native([stems[n] for n in rest], kind)
        out.update({n: native[stems[n]] for n in rest if stems[n] in native and native[stems[n]] in modules})
    missing = [n for n in names if n not in out]
    if missing:
        if denoiser is None:
            raise NeedsInputError(
                f"{path}: the module names of this kohya file ({missing[0]}, ...) are resolved against the base "
                "model's own modules: pass the denoiser (load_tlora does; convert_tlora(..., denoiser=pipe); "
                "the command line's --model PATH)", "denoiser", {"modules": sorted(names)})
        raise ValueError(
            f"{path}: {len(missing)} kohya module name(s) match no module of {cls} (a file for another base model?), "
            f"e.g. {', '.join(missing[:3])}"
        )
    return out


# -- conversion ------------------------------------------------------------------------------------

def _modules(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        m = _KEY.match(key)
        modules[m["name"]][m["param"]] = value
    text = sorted(n for n in modules if n.startswith(_TEXT))
    if text:
        raise ValueError(
            f"{path}: holds {len(text)} text-encoder LoRA layer(s) ({text[0]}, ...), which a T-LoRA does not mask "
            "and load_tlora does not place. Load the whole file the stock way and mask its denoiser layers: "
            "pipe.load_lora_weights(path); TLoRAPatch(pipe, tlora_diffusers.read_schedule(path))"
        )
    other = sorted(n for n in modules if not n.startswith(PREFIXES))
    if other:
        raise ValueError(f"{path}: keys {other[:3]} start with neither {' nor '.join(PREFIXES)}")
    for name, params in modules.items():
        kind = set(params) - {"alpha"}
        if kind not in (set(VANILLA), set(ORTHO)):
            raise ValueError(f"{path}: {name} has {sorted(params)}; expected {list(VANILLA)} (+ alpha) or the "
                             f"ortho set {list(ORTHO)} (+ alpha)")
    return dict(modules)


def _convert_kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                   denoiser: Optional[nn.Module], cfg: Optional[TLoRAConfig], *, min_rank: Optional[int] = None,
                   alpha: Optional[float] = None) -> ConvertedTLoRA:
    """Convert a kohya-style T-LoRA (or an ordinary kohya LoRA with a schedule from the caller) to PEFT form."""
    check_denoiser(denoiser)
    modules = _modules(tensors, path)
    kinds = {"ortho" if "q_layer.weight" in p else "vanilla" for p in modules.values()}
    if len(kinds) != 1:
        raise ValueError(f"{path}: mixes LoRA and ortho T-LoRA modules; one file is one kind")
    variant = kinds.pop()
    ranks = {(p["q_layer.weight"] if variant == "ortho" else p["lora_down.weight"]).shape[0] for p in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"{path}: modules have different ranks {sorted(ranks)}; a T-LoRA schedule has one max_rank")
    rank = ranks.pop()
    layout = "paired" if variant == "ortho" else "plain"
    filed, source = kohya_schedule(metadata, rank, path)
    if filed is not None and filed.layout != "plain" and variant == "ortho":
        filed = TLoRAConfig(filed.max_rank, filed.min_rank, filed.alpha)  # the ortho keys carry the layout
    names = sorted(modules)
    component = "transformer" if any(n.startswith("lora_transformer_") for n in names) or (
        denoiser is not None and "UNet" not in type(denoiser).__name__) else "unet"
    schedule = schedule_config(path, rank, layout, cfg, min_rank, alpha)
    if schedule is not None and filed is not None and (schedule.min_rank, schedule.alpha) != (filed.min_rank, filed.alpha):
        raise ValueError(f"{path}: the file's schedule {filed} (from its metadata) contradicts "
                         f"min_rank={schedule.min_rank}, alpha={schedule.alpha}; leave those out to use the file's")
    schedule = schedule or (TLoRAConfig(filed.max_rank, filed.min_rank, filed.alpha, layout=layout) if filed else None)
    paths = module_paths(names, denoiser, path)
    state_dict: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for name in names:
        params, target = modules[name], paths[name]
        scale_alpha = float(params["alpha"].float()) if "alpha" in params else float(rank)
        if variant == "vanilla":
            a, b = params["lora_down.weight"], params["lora_up.weight"]
            alphas[target] = scale_alpha
        else:
            a, b = paired_lora_factors(params["p_layer.weight"], params["lambda_layer"], params["q_layer.weight"],
                                       params["base_p.weight"], params["base_lambda_buf"], params["base_q.weight"],
                                       scale_alpha / rank)
            a = _conv_shape(a, denoiser, target)
            alphas[target] = float(2 * rank)  # the paired encoding carries its scale: lora_alpha / r = 1
        state_dict[f"{target}.lora_A.weight"] = a
        state_dict[f"{target}.lora_B.weight"] = b if b.ndim == a.ndim or a.ndim == 2 else b[..., None, None]
    lora_rank = rank * (2 if layout == "paired" else 1)
    targets = tuple(paths[n] for n in names)
    partial = {"variant": variant, "layout": layout, "rank": rank, "lora_rank": lora_rank, "config": "needs cfg",
               "modules": list(targets), "component": component, "source": source or "kohya (ordinary LoRA)",
               "notes": []}
    if schedule is None:
        raise NeedsInputError(
            f"{path}: a kohya LoRA whose metadata declares no T-LoRA schedule (no tlora_config, ss_tlora_* or "
            f"ss_adapter=tlora): an ordinary LoRA. To mask it as a T-LoRA, pass the schedule it was trained with: "
            f"cfg=TLoRAConfig(max_rank={rank}, min_rank=..., alpha=...) or min_rank=... (and alpha=..., default 1.0)",
            "cfg", partial)
    values = sorted(set(alphas.values()))
    lora_config: dict[str, Any] = {"r": lora_rank, "lora_alpha": values[0], "target_modules": list(targets)}
    if len(values) > 1:
        lora_config["alpha_pattern"] = {t: a for t, a in alphas.items() if a != values[0]}
    notes = []
    if source == "fizgig":
        notes.append("Fizgig rounds the timestep down to a whole number (int(t·1000)) before its linear schedule; "
                     "masks here use the exact t, one rank apart at about 1.5% of timesteps")
    meta = TLoRAFileMetadata(schedule, variant=variant, base_model=type(denoiser).__name__ if denoiser is not None else None,
                             component=component, target_modules=targets, source_format=source or "kohya")
    return ConvertedTLoRA(state_dict, lora_config, meta, "kohya", notes)


def _conv_shape(a: torch.Tensor, denoiser: Optional[nn.Module], target: str) -> torch.Tensor:
    """The fork stores an ortho conv's ``q`` flattened ``(r, in·kh·kw)``: back to the target conv's kernel."""
    module = dict(denoiser.named_modules()).get(target) if denoiser is not None else None
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Conv2d):
        return a.reshape(a.shape[0], module.in_channels, *module.kernel_size)
    return a


FORMAT = TLoRAFormat(
    "kohya",
    "kohya-style LoRA/T-LoRA: lora_unet_*/lora_transformer_* with lora_down/lora_up/alpha, or the sd-scripts "
    "T-LoRA fork's ortho q_layer/p_layer/lambda_layer/base_*; schedule from tlora_config, ss_tlora_* or ss_adapter",
    _is_kohya,
    _convert_kohya,
)
