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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

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
    """module path -> (A, B, scale) with PEFT's per-module scaling ``lora_alpha / r`` (or ``alpha_pattern``)."""
    config = converted.lora_config
    r = config["r"]
    pattern = config.get("alpha_pattern") or {}
    out = {}
    for key, a in converted.state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        b = converted.state_dict[f"{path}.lora_B.weight"]
        alpha = next((v for k, v in pattern.items() if path == k or path.endswith("." + k)), config["lora_alpha"])
        out[path] = (a, b, float(alpha) / r)
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


def _base_metadata(converted: ConvertedTLoRA) -> dict[str, str]:
    return {"format": "pt", TLORA_METADATA_KEY: converted.meta.to_json()}


def _write_kohya(converted: ConvertedTLoRA, dst: Path) -> Exported:
    cfg = converted.meta.config
    tensors: dict[str, torch.Tensor] = {}
    paired = cfg.layout == "paired"
    for path, (a, b, scale) in _modules(converted).items():
        name = _kohya_name(converted, path)
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
    return Exported(path, "kohya", (note,))


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


def export_converted(converted: ConvertedTLoRA, dst: Union[str, Path], to: str = "tlora") -> Exported:
    """Write ``converted`` as ``to`` (one of :data:`EXPORT_FORMATS`) at ``dst`` (a ``.safetensors`` path, or a folder)."""
    from .inspect import write_converted

    if to not in EXPORT_FORMATS:
        raise ValueError(f"to must be one of {', '.join(EXPORT_FORMATS)}, got {to!r}")
    from .inspect import output_path

    dst = output_path(dst, to)
    if to == "tlora":
        return Exported(write_converted(converted, dst), "tlora")
    writer = {"kohya": _write_kohya, "comfyui-tlora": _write_comfyui, "static": _write_static}[to]
    return writer(converted, dst)
