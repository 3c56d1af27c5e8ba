"""The paper's own checkpoints (ControlGenAI/T-LoRA) as PEFT LoRAs.

The paper's code trains LoRA *attention processors* and saves their state dict through
diffusers' ``AttnProcsLayers``: SDXL with ``unet.save_attn_procs`` →
``pytorch_lora_weights.safetensors``, Flux with ``torch.save`` → ``lora.pt``. Keys are
``<processor name>.to_{q,k,v,out,q_proj,k_proj,v_proj}_lora.<param>`` where the processor
name is ``<attention module path>.processor``. Each processor adds, per projection
(``tlora/model/lora.py``):

* vanilla ``LoRALinearLayer``: ``up(down(x) * mask)``, no alpha (scale 1);
* ortho ``OrthogonalLoRALinearLayer``: ``p(q(x)·λ·mask) − base_p(base_q(x)·base_λ·mask)``,
  with the frozen base stored in the file, so the conversion is exact
  (:func:`tlora_diffusers.ortho.paired_lora_factors`, ``layout="paired"``).

``to_out`` is ``attn.to_out[0]`` and ``to_{q,k,v}_proj`` are Flux's ``attn.add_{q,k,v}_proj``.
The Flux processor is installed on single-stream blocks too, where it never uses its
``to_out`` and ``*_proj`` layers (single blocks have neither): those are dropped. The rank
schedule is not in these files (it is in the run's ``logs/hparams.yml``): pass ``cfg`` or
``min_rank=`` / ``alpha=``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config import TLoRAConfig
from ..ortho import paired_lora_factors
from .common import NeedsInputError, check_denoiser, default_lora_config, schedule_config
from .format import TLORA_METADATA_KEY, TLoRAFileMetadata
from .formats import ConvertedTLoRA, TLoRAFormat

__all__ = ["FORMAT", "PAPER_KEY", "PROJECTIONS"]

_VANILLA = ("down.weight", "up.weight")
_ORTHO = ("q_layer.weight", "p_layer.weight", "lambda_layer", "base_q.weight", "base_p.weight", "base_lambda")
#: Processor layer name → the attention submodule it adds to (``FluxLoraAttnProcessor.__call__``).
PROJECTIONS = {
    "to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0",
    "to_q_proj": "add_q_proj", "to_k_proj": "add_k_proj", "to_v_proj": "add_v_proj",
}
#: One key of a paper checkpoint (an optional ``unet.``/``transformer.`` prefix, as the ComfyUI-T-LoRA loader allows).
PAPER_KEY = re.compile(
    r"^(?:unet\.|transformer\.)?(?P<attn>.+)\.processor\.(?P<proj>to_(?:q|k|v|out|q_proj|k_proj|v_proj))_lora\."
    r"(?P<param>" + "|".join(re.escape(p) for p in _VANILLA + _ORTHO) + r")$"
)
_SINGLE_BLOCK = re.compile(r"(?:^|\.)single_transformer_blocks\.\d+\.attn$")
_UNUSED_IN_SINGLE = {"to_out", "to_q_proj", "to_k_proj", "to_v_proj"}


def _is_paper(keys: list[str], metadata: dict[str, str]) -> bool:
    return bool(keys) and all(PAPER_KEY.match(k) for k in keys)


def _layers(tensors: dict[str, torch.Tensor]) -> tuple[dict[tuple[str, str], dict[str, torch.Tensor]], int]:
    """Tensors grouped by (attention path, processor layer), and how many unused single-block layers were dropped."""
    layers: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    dropped = set()
    for key, value in tensors.items():
        m = PAPER_KEY.match(key)
        attn, proj, param = m["attn"], m["proj"], m["param"]
        if proj in _UNUSED_IN_SINGLE and _SINGLE_BLOCK.search(attn):
            dropped.add((attn, proj))
            continue
        layers[(attn, proj)][param] = value
    return dict(layers), len(dropped)


def _variant(layers: dict[tuple[str, str], dict[str, torch.Tensor]], path: Path) -> str:
    kinds = {}
    for (attn, proj), params in layers.items():
        names = set(params)
        kind = "vanilla" if names == set(_VANILLA) else "ortho" if names == set(_ORTHO) else None
        if kind is None:
            raise ValueError(
                f"{path}: {attn}.processor.{proj}_lora has {sorted(names)}; expected {list(_VANILLA)} (LoRA) "
                f"or {list(_ORTHO)} (orthogonal T-LoRA)"
            )
        kinds[kind] = f"{attn}.processor.{proj}_lora"
    if len(kinds) > 1:
        raise ValueError(
            f"{path}: mixes LoRA ({kinds['vanilla']}) and orthogonal ({kinds['ortho']}) layers; one file is one kind"
        )
    return kinds.popitem()[0]


def _rank(params: dict[str, torch.Tensor], variant: str, where: str) -> int:
    """Check one layer's shapes (down/q (r, in), up/p (out, r), λ (1, r)) and return r."""
    if variant == "vanilla":
        a, b, lams = params["down.weight"], params["up.weight"], []
        pairs = [(a, b)]
    else:
        a, b = params["q_layer.weight"], params["p_layer.weight"]
        pairs = [(a, b), (params["base_q.weight"], params["base_p.weight"])]
        lams = [params["lambda_layer"], params["base_lambda"]]
    r = a.shape[0] if a.ndim == 2 else -1
    ok = all(q.ndim == 2 and p.ndim == 2 and q.shape == (r, a.shape[1]) and p.shape == (b.shape[0], r) for q, p in pairs)
    if not ok or any(lam.numel() != r or lam.ndim > 2 for lam in lams):
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(params.items()))
        raise ValueError(f"{where}: inconsistent shapes {shapes}; expected (r, in) / (out, r) / (1, r)")
    return r


def _convert_paper(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    denoiser: Optional[nn.Module],
    cfg: Optional[TLoRAConfig],
    *,
    min_rank: Optional[int] = None,
    alpha: Optional[float] = None,
) -> ConvertedTLoRA:
    """Convert a ControlGenAI/T-LoRA checkpoint; ``denoiser`` is not needed (the ortho base is stored).

    ``alpha`` defaults to 1.0 when ``min_rank`` is given: the Flux code's schedule is linear
    and 1 is the default exponent of the SDXL code's ``get_mask_by_timestep``.
    """
    check_denoiser(denoiser)
    layers, dropped = _layers(tensors)
    if not layers:
        raise ValueError(f"{path}: every layer belongs to single-stream blocks that never use it; nothing to load")
    variant = _variant(layers, path)
    ranks = {_rank(params, variant, f"{path}: {attn}.processor.{proj}_lora") for (attn, proj), params in layers.items()}
    if len(ranks) != 1:
        raise ValueError(f"{path}: layers have different ranks {sorted(ranks)}; a T-LoRA schedule has one max_rank")
    rank = ranks.pop()
    layout = "paired" if variant == "ortho" else "plain"
    state_dict: dict[str, torch.Tensor] = {}
    for (attn, proj), params in sorted(layers.items()):
        target = f"{attn}.{PROJECTIONS[proj]}"
        if variant == "vanilla":
            a, b = params["down.weight"], params["up.weight"]
        else:
            a, b = paired_lora_factors(
                params["p_layer.weight"], params["lambda_layer"], params["q_layer.weight"],
                params["base_p.weight"], params["base_lambda"], params["base_q.weight"], 1.0,
            )
        state_dict[f"{target}.lora_A.weight"] = a
        state_dict[f"{target}.lora_B.weight"] = b
    lora_rank = rank * (2 if layout == "paired" else 1)
    targets = tuple(sorted(k.rpartition(".lora_")[0] for k in state_dict if ".lora_A." in k))
    notes = []
    if dropped:
        notes.append(
            f"dropped {dropped} layer(s) of single_transformer_blocks (to_out/to_*_proj): the paper's Flux processor "
            "saves them but never uses them (single-stream blocks have no to_out or add_*_proj)"
        )
    component = "unet" if any(t.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for t in targets) else "transformer"
    schedule = schedule_config(path, rank, layout, cfg, min_rank, alpha)
    if schedule is None and TLORA_METADATA_KEY in metadata:  # our comfyui-tlora export carries its schedule
        filed = TLoRAFileMetadata.from_json(metadata[TLORA_METADATA_KEY], where=str(path)).config
        schedule = TLoRAConfig(filed.max_rank, filed.min_rank, filed.alpha, layout=layout)
    if schedule is None:
        layout_arg = f", layout={layout!r}" if layout != "plain" else ""
        raise NeedsInputError(
            f"{path}: ControlGenAI/T-LoRA checkpoints do not store the rank schedule. Pass "
            f"cfg=TLoRAConfig(max_rank={rank}, min_rank=..., alpha=...{layout_arg}) "
            "or min_rank=... (and alpha=..., default 1.0): the run's min_rank and alpha_rank_scale from its "
            "logs/hparams.yml (the Flux script's --min_rank; its schedule is linear, alpha=1.0)",
            "cfg",
            {"variant": variant, "layout": layout, "rank": rank, "lora_rank": lora_rank, "config": "needs cfg",
             "modules": list(targets), "component": component, "notes": notes},
        )
    meta = TLoRAFileMetadata(
        schedule, variant=variant, base_model=type(denoiser).__name__ if denoiser is not None else None,
        component=component, target_modules=targets, source_format="controlgenai",
    )
    return ConvertedTLoRA(state_dict, default_lora_config(state_dict, lora_rank), meta, "controlgenai", notes)


FORMAT = (
    TLoRAFormat(
        "controlgenai",
        "ControlGenAI/T-LoRA (the paper's code) attention processors: <attn>.processor.to_{q,k,v,out}_lora."
        "{down,up}.weight or {q_layer,p_layer,base_q,base_p}.weight/lambda_layer/base_lambda (SDXL safetensors, Flux lora.pt)",
        _is_paper,
        _convert_paper,
    )
)
