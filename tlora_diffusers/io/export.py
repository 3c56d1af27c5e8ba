"""Write a T-LoRA for other tools: kohya loaders and the sd-scripts T-LoRA fork, the ComfyUI-T-LoRA node,
or any LoRA loader without masking.

Every writer starts from the PEFT form every reader produces (:class:`~.formats.ConvertedTLoRA`) and
writes atomically (:func:`~tlora_diffusers.io.format.atomic_save_safetensors`):

* ``kohya``: ``lora_unet_<path>`` / ``lora_transformer_<path>`` keys (dots as underscores; what ComfyUI's
  loader and the sd-scripts fork map), ``.alpha`` tensors, our ``tlora_config`` and its ``ss_tlora_*`` mirror
  (:func:`tlora_diffusers.metadata.ss_mirror`). A paired (ortho) T-LoRA is written as the fork's ortho
  keys (``q_layer``/``p_layer``/``lambda_layer``/``base_q``/``base_p``/``base_lambda_buf``): LoRA ranks
  ``2i`` and ``2i+1`` become the live and the base component of schedule rank ``i``, so the fork's
  prefix mask on both is our paired mask, exactly.
* ``comfyui-tlora``: the attention-processor layout ComfyUI-T-LoRA masks
  (bghira/ComfyUI-T-LoRA@d9c993d ``nodes_tlora.py``): ``<attn>.processor.to_{q,k,v,out}_lora.{down,up}.weight``
  (Flux: ``transformer.`` prefix; ``add_{q,k,v}_proj`` as ``to_{q,k,v}_proj``), the LoRA scale folded into
  ``up`` (the node applies none and reads no metadata), ortho as ``q_layer``/``p_layer``/``lambda_layer``/
  ``base_*``. Only attention projections: every other target is listed in a warning.
* ``static``: a plain kohya LoRA of all ranks (an ortho T-LoRA stacked exactly to rank 2R), labelled
  unmasked in its metadata: what a T-LoRA gives in a loader that cannot mask.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from ..metadata import TLORA_METADATA_KEY, ss_mirror
from .format import atomic_save_safetensors
from .formats import ConvertedTLoRA

__all__ = ["EXPORT_FORMATS", "Exported", "export_converted", "node_settings"]

#: What ``convert_tlora(..., to=...)`` and ``tlora-diffusers convert --to`` write.
EXPORT_FORMATS = ("tlora", "kohya", "comfyui-tlora", "static")
_STATIC_NOTE = ("unmasked: every rank at every step. This is a T-LoRA's weights for loaders without timestep "
                "masking; the trained T-LoRA masks ranks by timestep (tlora_diffusers.TLoRAPatch, ComfyUI-T-LoRA)")
_ATTENTION = re.compile(r"^(?P<attn>.+\.(?:attn|attn1|attn2))\.(?P<proj>to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                        r"add_v_proj)$")
_NODE_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out", "add_q_proj": "to_q_proj",
               "add_k_proj": "to_k_proj", "add_v_proj": "to_v_proj"}


@dataclass(frozen=True)
class Exported:
    """What a writer wrote: the file, the format, and what the user must know (node settings, dropped targets)."""

    path: Path
    format: str
    notes: tuple[str, ...] = ()
    #: targets the written format cannot hold (``comfyui-tlora``: everything but attention projections)
    dropped: tuple[str, ...] = ()


def _modules(converted: ConvertedTLoRA) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module path -> (A, B, scale) with PEFT's own per-module scaling: ``lora_alpha / r``, ``alpha_pattern``
    matched as PEFT matches it (``get_pattern_key``), ``/ sqrt(r)`` with ``use_rslora``. Tensors the exported
    formats cannot hold (DoRA magnitudes, LoRA biases) are refused, never dropped."""
    from peft.utils.other import get_pattern_key

    config = converted.lora_config
    extra = sorted(k for k in converted.state_dict if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if extra or config.get("use_dora") or config.get("lora_bias"):
        raise ValueError(f"{extra[:3] or 'use_dora/lora_bias'}: DoRA magnitudes and LoRA biases have no place in the "
                         "exported formats (kohya, comfyui-tlora, static); export a plain LoRA")
    pattern = config.get("alpha_pattern") or {}
    out = {}
    for key, a in converted.state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        b = converted.state_dict[f"{path}.lora_B.weight"]
        r = a.shape[0]  # rank_pattern included
        alpha = pattern.get(get_pattern_key(list(pattern), path), config["lora_alpha"])
        out[path] = (a, b, float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r))
    return out


def _ortho_parts(a: torch.Tensor, b: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """A paired LoRA (ranks 2i, 2i+1 = schedule rank i) as live and base ortho components, λ = 1, scale folded."""
    q, q0 = a[0::2].reshape(a.shape[0] // 2, -1), a[1::2].reshape(a.shape[0] // 2, -1)
    bb = b.reshape(b.shape[0], -1)
    p, p0 = bb[:, 0::2] * scale, -bb[:, 1::2] * scale
    ones = torch.ones(1, q.shape[0], dtype=q.dtype)
    return {"q_layer.weight": q, "p_layer.weight": p, "lambda_layer": ones, "base_q.weight": q0, "base_p.weight": p0,
            "base_lambda": ones.clone()}


def _kohya_name(converted: ConvertedTLoRA, path: str) -> str:
    prefix = "lora_unet_" if converted.meta.component == "unet" else "lora_transformer_"
    return prefix + path.replace(".", "_")


KOHYA_NAMES = ("auto", "sgm", "diffusers")
_UNET_ATTENTION = re.compile(r"^(?:down_blocks\.(?P<d>\d+)|up_blocks\.(?P<u>\d+)|(?P<m>mid_block))\.attentions\."
                             r"(?P<j>\d+)\.(?P<rest>.+)$")


def _is_sdxl(converted: ConvertedTLoRA, unet_config: Any) -> bool:
    """An SDXL UNet: from its config when known (``addition_embed_type = "text_time"``), else from the LoRA's
    modules (SDXL's attentions hold several transformer blocks; SD 1.x/2.x's hold one)."""
    if converted.meta.component != "unet":
        return False
    if unet_config is not None:
        return getattr(unet_config, "addition_embed_type", None) == "text_time"
    return any(re.search(r"\.transformer_blocks\.[1-9]", p) for p in _modules(converted))


def _sgm_path(path: str, layers_per_block: int) -> str:
    """A diffusers UNet module path as SDXL's SGM UNet names it (sd-scripts' ``sdxl_original_unet``): the
    inverse of diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` for attention modules."""
    m = _UNET_ATTENTION.match(path)
    if m is None:
        raise ValueError(f"{path}: only attention modules have an SGM (sd-scripts SDXL) name here; export with "
                         "kohya_names='diffusers' (--kohya-names diffusers), which ComfyUI also loads")
    j = int(m["j"])
    if m["m"] is not None:
        return f"middle_block.1.{m['rest']}"
    if m["d"] is not None:
        return f"input_blocks.{1 + int(m['d']) * (layers_per_block + 1) + j}.1.{m['rest']}"
    return f"output_blocks.{int(m['u']) * (layers_per_block + 1) + j}.1.{m['rest']}"


def _renamed(name: str, words: tuple[tuple[str, str], ...]) -> str:
    for old, new in words:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _sgm_names(converted: ConvertedTLoRA, unet_config: Any) -> dict[str, str]:
    """module path -> kohya name in SGM layout, each checked by mapping it back with diffusers' own converter."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    L = getattr(unet_config, "layers_per_block", None) if unet_config is not None else 2  # SDXL's
    if not isinstance(L, int):
        raise ValueError(f"SGM names need one layers_per_block for every UNet block, got {L!r}")
    names = {p: "lora_unet_" + _sgm_path(p, L).replace(".", "_") for p in _modules(converted)}
    back = _maybe_map_sgm_blocks_to_diffusers({n: p for p, n in names.items()}, SimpleNamespace(layers_per_block=L))
    # diffusers renumbers the blocks and keeps the SGM block words, which its key converter renames afterwards
    words = (("lora_unet_input_blocks_", "lora_unet_down_blocks_"), ("lora_unet_middle_block_", "lora_unet_mid_block_"),
             ("lora_unet_output_blocks_", "lora_unet_up_blocks_"))
    wrong = [p for n, p in back.items() if _renamed(n, words) != _kohya_name(converted, p)]
    if wrong or len(back) != len(names):
        raise ValueError(f"SGM names of {wrong[:3] or sorted(names)[:3]} do not map back with diffusers' converter; "
                         "export with kohya_names='diffusers'")
    return names


def _base_metadata(converted: ConvertedTLoRA) -> dict[str, str]:
    return {"format": "pt", TLORA_METADATA_KEY: converted.meta.to_json()}


def _write_kohya(converted: ConvertedTLoRA, dst: Path, kohya_names: str = "auto", unet_config: Any = None) -> Exported:
    if kohya_names not in KOHYA_NAMES:
        raise ValueError(f"kohya_names must be one of {', '.join(KOHYA_NAMES)}, got {kohya_names!r}")
    sgm = kohya_names == "sgm" or (kohya_names == "auto" and _is_sdxl(converted, unet_config))
    if sgm and converted.meta.component != "unet":
        raise ValueError(f"kohya_names='sgm' names UNet modules; this T-LoRA is on a {converted.meta.component}")
    sgm_names = _sgm_names(converted, unet_config) if sgm else {}
    cfg = converted.meta.config
    tensors: dict[str, torch.Tensor] = {}
    paired = cfg.layout == "paired"
    for path, (a, b, scale) in _modules(converted).items():
        name = sgm_names.get(path) or _kohya_name(converted, path)
        if paired:
            for k, v in _ortho_parts(a, b, scale).items():
                tensors[f"{name}.{'base_lambda_buf' if k == 'base_lambda' else k}"] = v.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(cfg.max_rank))  # scale alpha / r = 1: folded into p
        else:
            tensors[f"{name}.lora_down.weight"] = a.contiguous()
            tensors[f"{name}.lora_up.weight"] = b.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(scale * a.shape[0])
    metadata = {**_base_metadata(converted), **ss_mirror(converted.meta, converted.lora_config)}
    path = atomic_save_safetensors(tensors, dst, metadata)
    note = ("ortho T-LoRA written as the sd-scripts T-LoRA fork's ortho keys (q_layer/p_layer/lambda_layer/base_*): "
            "that fork and tlora_diffusers mask it; loaders without ortho support need --to static" if paired else
            "kohya loaders load it (ComfyUI, sd-scripts); the sd-scripts T-LoRA fork and tlora_diffusers mask it "
            "from its metadata")
    naming = ("UNet modules in SDXL's SGM names (input_blocks/middle_block/output_blocks), as sd-scripts' SDXL UNet "
              "names them; --kohya-names diffusers writes diffusers' names" if sgm else
              "modules in diffusers' names" + ("; an SDXL UNet for sd-scripts needs --kohya-names sgm"
                                                if converted.meta.component == "unet" else ""))
    return Exported(path, "kohya", (note, naming))


def _write_comfyui(converted: ConvertedTLoRA, dst: Path) -> Exported:
    cfg = converted.meta.config
    flux = converted.meta.component == "transformer"
    tensors: dict[str, torch.Tensor] = {}
    dropped = []
    for path, (a, b, scale) in _modules(converted).items():
        m = _ATTENTION.match(path)
        single = ".single_transformer_blocks." in f".{path}"
        if m is None or (single and m["proj"] not in ("to_q", "to_k", "to_v")) or a.ndim != 2:
            dropped.append(path)
            continue
        proj = _NODE_NAMES[m["proj"]]
        if cfg.layout == "paired" and flux and proj != "to_out":
            raise ValueError(
                f"{path}: ComfyUI-T-LoRA takes an ortho T-LoRA on Flux's fused q/k/v only as a plain LoRA (it drops "
                "ortho adapters on fused slices): use --to kohya (masked by the sd-scripts fork and tlora_diffusers) "
                "or --to static (unmasked)"
            )
        name = ("transformer." if flux else "") + f"{m['attn']}.processor.{proj}_lora"
        if cfg.layout == "paired":
            for k, v in _ortho_parts(a, b, scale).items():
                tensors[f"{name}.{k}"] = v.contiguous()
        else:
            tensors[f"{name}.down.weight"] = a.contiguous()
            tensors[f"{name}.up.weight"] = (b * scale).contiguous()  # the node applies no alpha / rank
    if not tensors:
        raise ValueError("no attention projection (to_q/to_k/to_v/to_out.0/add_*_proj) among the T-LoRA's targets: "
                         "ComfyUI-T-LoRA masks nothing else; use --to kohya or --to static")
    path = atomic_save_safetensors(tensors, dst, _base_metadata(converted))
    notes = [node_settings(converted)]
    if dropped:
        kinds = sorted({re.sub(r"^.*blocks\.\d+\.", "", d) for d in dropped})
        notes.append(f"ComfyUI-T-LoRA masks attention projections only: {len(dropped)} target(s) left out of "
                     f"{path.name} (their LoRA does not run there): {', '.join(kinds)} (e.g. {dropped[0]})")
    return Exported(path, "comfyui-tlora", tuple(notes), dropped=tuple(dropped))


def node_settings(converted: ConvertedTLoRA) -> str:
    """What to type into the ComfyUI-T-LoRA node for this T-LoRA (it reads no metadata)."""
    cfg = converted.meta.config
    flux = converted.meta.component == "transformer"
    timestep = ("1 (Flux models pass the flow time σ in 0..1; the node's automatic value would be 1000 and pin the "
                "rank near max_rank)" if flux else "0 (automatic: 1000 for SDXL)")
    return (f"ComfyUI-T-LoRA node settings: max_rank {cfg.max_rank}, min_rank {cfg.min_rank}, alpha {cfg.alpha:g}, "
            f"max_timestep {timestep}, strength_model 1.0")


def _write_static(converted: ConvertedTLoRA, dst: Path) -> Exported:
    tensors: dict[str, torch.Tensor] = {}
    for path, (a, b, scale) in _modules(converted).items():
        name = _kohya_name(converted, path)
        tensors[f"{name}.lora_down.weight"] = a.contiguous()
        tensors[f"{name}.lora_up.weight"] = b.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(scale * a.shape[0])
    metadata = {"format": "pt", "tlora_static": _STATIC_NOTE,
                "tlora_trained_schedule": json.dumps(converted.meta.config.to_dict())}
    path = atomic_save_safetensors(tensors, dst, metadata)
    return Exported(path, "static", (f"{path.name}: {_STATIC_NOTE}",))


def export_converted(converted: ConvertedTLoRA, dst: Union[str, Path], to: str = "tlora", *,
                     kohya_names: str = "auto", unet_config: Any = None) -> Exported:
    """Write ``converted`` as ``to`` (one of :data:`EXPORT_FORMATS`) at ``dst`` (a ``.safetensors`` path, or a folder).

    ``kohya_names`` (``to="kohya"``): ``"sgm"`` names an SDXL UNet's modules as sd-scripts does
    (``input_blocks_4_1_...``), ``"diffusers"`` as diffusers does (``down_blocks_1_attentions_0_...``; ComfyUI loads
    both), ``"auto"``: SGM for an SDXL UNet (``unet_config``, the base model's config, decides; without it, the
    LoRA's modules). Other formats ignore it.
    """
    from .inspect import write_converted

    if to not in EXPORT_FORMATS:
        raise ValueError(f"to must be one of {', '.join(EXPORT_FORMATS)}, got {to!r}")
    from .inspect import output_path

    dst = output_path(dst, to)
    if to == "tlora":
        return Exported(write_converted(converted, dst), "tlora")
    if to == "kohya":
        return _write_kohya(converted, dst, kohya_names, unet_config)
    writer = {"comfyui-tlora": _write_comfyui, "static": _write_static}[to]
    return writer(converted, dst)
