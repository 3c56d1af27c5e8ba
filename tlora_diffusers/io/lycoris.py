"""LyCORIS ``tlora`` files (lycoris-lora >= 4.1, also what SimpleTuner saves) as exact PEFT LoRAs.

A LyCORIS T-LoRA module (``lycoris/modules/tlora.py``, ``TLoraModule``) computes
``y = W·x + b + (α/r)·[P·diag(λ⊙m)·Q − P₀·diag(λ₀⊙m)·Q₀]·x``. Its files keep only
``<name>.q_layer.weight`` (Q, (r, in)), ``p_layer.weight`` (P, (out, r)), ``lambda_layer``
(λ, (1, r)) and ``alpha``; the frozen base (P₀, λ₀, Q₀) is not saved. LyCORIS rebuilds it
at load (``TLoraModule.make_module_from_state_dict`` → ``_initialize_from_svd`` with
``sig_type="principal"``, ``use_data_init=True``): the top-r SVD triplets of the layer's
base weight, computed in float32. This module does the same, batched (one SVD per group of
equally shaped layers), and writes each module as a rank-2r PEFT LoRA with
:func:`tlora_diffusers.ortho.paired_lora_factors`, so masking schedule rank i masks the
LoRA ranks 2i and 2i+1 (``TLoRAConfig(layout="paired")``).

Names are ``f"{prefix}_{module path}".replace(".", "_")`` (``lycoris/wrapper.py``,
``create_lycoris_from_weights``). That is not invertible (``to_out_0`` vs ``to_out.0``), so
names are resolved by walking the denoiser's ``named_modules()`` as LyCORIS does.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..config import TLoRAConfig
from ..ortho import SIG_TYPES, paired_lora_factors, svd_basis
from .common import NeedsInputError, check_denoiser, default_lora_config, schedule_config
from .format import TLoRAFileMetadata, json_object
from .formats import ConvertedTLoRA, TLoRAFormat

__all__ = ["FORMAT", "lycoris_config_of", "LYCORIS_PARAMS", "LYCORIS_CONFIG_KEY"]

#: Tensors LyCORIS saves per ``tlora`` module (``TLoraModule.weight_list``).
LYCORIS_PARAMS = ("q_layer.weight", "p_layer.weight", "lambda_layer", "alpha")
#: Metadata key SimpleTuner writes the LyCORIS JSON config under (``save_hooks._save_lycoris``).
LYCORIS_CONFIG_KEY = "lycoris_config"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Weights stacked into one batched SVD hold at most this many elements (256 MiB in float32).
_SVD_BATCH_ELEMENTS = 1 << 26


def lycoris_config_of(source: Union[str, Path, Mapping[str, Any]], where: str) -> dict[str, Any]:
    """A LyCORIS JSON config given as a dict, a JSON text or the path of SimpleTuner's ``lycoris_config.json``."""
    if isinstance(source, Mapping):
        return dict(source)
    text = str(source)
    if not text.lstrip().startswith("{"):
        try:
            text = Path(source).read_text()
        except OSError as e:
            raise ValueError(f"{where}: cannot read the LyCORIS config {source} ({e})") from None
    return _parse_lycoris_json(text, where)


def _parse_lycoris_json(text: str, where: str) -> dict[str, Any]:
    return json_object(text, where, "the LyCORIS config")


def _tlora_from_lycoris(data: dict[str, Any], rank: int, path: Path, source: str) -> TLoRAConfig:
    """``TLoRAConfig.from_lycoris_config`` with max_rank from the shapes (SimpleTuner may drop linear_dim)."""
    if "linear_dim" in data and data["linear_dim"] != rank:
        raise ValueError(
            f"{path}: the LyCORIS config ({source}) says linear_dim={data['linear_dim']!r} but the file's "
            f"q_layer weights have rank {rank}; is it the config of another run?"
        )
    try:
        plain = TLoRAConfig.from_lycoris_config({**data, "linear_dim": rank})
    except ValueError as e:
        raise ValueError(f"{path}: {source}: {e}") from None
    return TLoRAConfig(plain.max_rank, plain.min_rank, plain.alpha, layout="paired")


# -- parsing the file ---------------------------------------------------------------------------


def _is_lycoris_tlora(keys: list[str], metadata: dict[str, str]) -> bool:
    """Any ``<name>.lambda_layer`` whose name has no dot (the paper's keys have dotted paths), and no
    frozen ``.base_lambda_buf`` nor the sd-scripts fork's ``ss_network_module`` (the fork stores its
    base; its format is ``kohya``)."""
    return (any(k.endswith(".lambda_layer") and "." not in k[: -len(".lambda_layer")] for k in keys)
            and not any(k.endswith(".base_lambda_buf") for k in keys)
            and not metadata.get("ss_network_module", "").startswith("networks.lora_tlora"))


def _group_modules(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    foreign = []
    for key, value in tensors.items():
        name, _, param = key.partition(".")
        if param in LYCORIS_PARAMS:
            modules[name][param] = value
        else:
            foreign.append(key)
    if foreign:
        raise ValueError(
            f"{path}: mixes LyCORIS algorithms: {len(foreign)} tensor(s) are not tlora parameters "
            f"{LYCORIS_PARAMS} (e.g. {', '.join(sorted(foreign)[:3])}); only tlora modules have a rank schedule "
            "to mask, so load the other modules with LyCORIS or train them as tlora"
        )
    required = {"q_layer.weight", "p_layer.weight", "lambda_layer"}
    incomplete = [f"{n} (has {sorted(p)})" for n, p in modules.items() if not required <= set(p)]
    if incomplete:
        raise ValueError(
            f"{path}: incomplete tlora modules, each needs q_layer.weight, p_layer.weight, lambda_layer: "
            + ", ".join(incomplete[:3])
        )
    return dict(modules)


def _rank_and_scales(modules: dict[str, dict[str, torch.Tensor]], path: Path) -> tuple[int, dict[str, float]]:
    """The common rank (q_layer rows) and each module's ``alpha / rank`` (``TLoraModule.__init__``)."""
    ranks = {name: p["q_layer.weight"].shape[0] for name, p in modules.items()}
    if len(set(ranks.values())) != 1:
        raise ValueError(
            f"{path}: tlora modules have different ranks {sorted(set(ranks.values()))}; a T-LoRA schedule has one max_rank"
        )
    rank = next(iter(ranks.values()))
    scales = {}
    for name, p in modules.items():
        q, pw, lam = p["q_layer.weight"], p["p_layer.weight"], p["lambda_layer"]
        if q.ndim < 2 or pw.ndim != q.ndim or pw.shape[1] != rank or lam.numel() != rank or lam.ndim > 2:
            raise ValueError(
                f"{path}: {name}: inconsistent shapes q_layer {tuple(q.shape)}, p_layer {tuple(pw.shape)}, "
                f"lambda_layer {tuple(lam.shape)} (expected (r, in), (out, r), (1, r) with r={rank})"
            )
        if q.ndim > 2 and any(s != 1 for s in (*q.shape[2:], *pw.shape[2:])):
            raise ValueError(f"{path}: {name}: conv factors must be 1x1 (LyCORIS tlora), got q_layer {tuple(q.shape)}")
        alpha = p.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise ValueError(f"{path}: {name}.alpha must be a scalar, got shape {tuple(alpha.shape)}")
        a = float(alpha) if alpha is not None else 0.0
        scales[name] = (a if a else rank) / rank  # alpha 0/None means alpha = rank
    return rank, scales


def _resolve_modules(
    denoiser: nn.Module, names: list[str], prefix: str, path: Path
) -> dict[str, tuple[str, nn.Module]]:
    """Map each LyCORIS name to ``(module path, base layer)`` by walking ``named_modules()``."""
    index: dict[str, list[tuple[str, nn.Module]]] = defaultdict(list)
    for module_path, module in denoiser.named_modules():
        if module_path:
            index[f"{prefix}_{module_path}".replace(".", "_")].append((module_path, module))
    found, missing = {}, []
    for name in names:
        candidates = [(p, getattr(m, "base_layer", m)) for p, m in index.get(name, [])]
        candidates = [(p, m) for p, m in candidates if isinstance(m, (nn.Linear, *_CONV))] or candidates
        if not candidates:
            missing.append(name)
        elif len(candidates) > 1:
            paths = ", ".join(p for p, _ in candidates)
            raise ValueError(f"{path}: {name} matches several modules ({paths}); cannot tell which")
        else:
            found[name] = candidates[0]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} LyCORIS module(s) do not exist in {type(denoiser).__name__} (a file for another "
            f"base model, or lora_prefix is not {prefix!r}?), e.g. {', '.join(sorted(missing)[:3])}"
        )
    return found


def _check_layer(name: str, module_path: str, module: nn.Module, p: dict[str, torch.Tensor], path: Path) -> None:
    where = f"{path}: {name} ({module_path})"
    if isinstance(module, _CONV):
        if any(k != 1 for k in module.kernel_size):
            raise ValueError(
                f"{where} is a {tuple(module.kernel_size)} {type(module).__name__}: LyCORIS tlora only works for 1x1 "
                "convolutions (its 1x1 factors reuse the layer's padding and do not fit a larger kernel; LyCORIS "
                "itself crashes on them); retrain without this layer"
            )
        if module.groups != 1:
            raise ValueError(f"{where}: grouped convolutions (groups={module.groups}) are not supported by LyCORIS tlora")
        in_f, out_f = module.in_channels, module.out_channels
    elif isinstance(module, nn.Linear):
        in_f, out_f = module.in_features, module.out_features
    else:
        raise ValueError(f"{where} is a {type(module).__name__}; a tlora module wraps a Linear or a 1x1 Conv")
    if getattr(module, "weight", None) is None or module.weight.is_meta:
        raise ValueError(f"{where}: the base weight is not materialised (meta device / offloaded); load the model first")
    q, pw = p["q_layer.weight"], p["p_layer.weight"]
    if q.shape[1] != in_f or pw.shape[0] != out_f or (q.ndim > 2) != isinstance(module, _CONV):
        raise ValueError(
            f"{where}: file shapes q_layer {tuple(q.shape)}, p_layer {tuple(pw.shape)} do not fit the layer "
            f"({type(module).__name__} {in_f} -> {out_f}); a file for another base model?"
        )


# -- rebuilding the frozen base -----------------------------------------------------------------


def _flat_weight(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


def _rebuild_bases(
    layers: dict[str, nn.Module], rank: int, sig_type: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(P₀, λ₀, Q₀)`` per layer: LyCORIS's ``_initialize_from_svd`` (float32 SVD of W), batched by shape.

    LyCORIS pads ranks beyond ``min(out, in)`` with zero vectors (and λ = 1e-6); so does this.
    """
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, module in layers.items():
        groups[(tuple(_flat_weight(module).shape), module.weight.device)].append(name)
    bases = {}
    for ((out_f, in_f), _device), names in groups.items():
        n = min(out_f, in_f)
        take = min(rank, n)
        if rank > n and sig_type == "middle":
            raise ValueError(f"rank {rank} exceeds min(out, in) = {n} of {names[0]}: sig_type='middle' is undefined there")
        step = max(1, _SVD_BATCH_ELEMENTS // (out_f * in_f))
        for i in range(0, len(names), step):
            chunk = names[i : i + step]
            stacked = torch.stack([_flat_weight(layers[name]).float() for name in chunk])
            p0, lam0, q0 = svd_basis(stacked, take, sig_type if rank <= n else "principal", where=chunk[0])
            if rank > n:
                p0 = torch.nn.functional.pad(p0, (0, rank - n))
                q0 = torch.nn.functional.pad(q0, (0, 0, 0, rank - n))
                lam0 = torch.nn.functional.pad(lam0, (0, rank - n), value=1e-6)
            for j, name in enumerate(chunk):
                bases[name] = (p0[j].cpu(), lam0[j].cpu(), q0[j].cpu())
    return bases


# -- the format ---------------------------------------------------------------------------------


def _component(denoiser: nn.Module) -> str:
    return "unet" if "UNet" in type(denoiser).__name__ else "transformer"


def _convert_lycoris(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    denoiser: Optional[nn.Module],
    cfg: Optional[TLoRAConfig],
    *,
    sig_type: str = "principal",
    use_data_init: bool = True,
    lycoris_config: Union[None, str, Path, Mapping[str, Any]] = None,
    min_rank: Optional[int] = None,
    alpha: Optional[float] = None,
    lora_prefix: Optional[str] = None,
) -> ConvertedTLoRA:
    """Convert a LyCORIS ``tlora`` file; ``denoiser`` (the base model) is required to rebuild P₀, λ₀, Q₀.

    Options: ``sig_type`` / ``use_data_init`` as the file was trained (LyCORIS's own loader
    assumes ``"principal"`` / ``True``); ``lycoris_config`` (SimpleTuner's JSON path, text or
    dict) or ``min_rank`` / ``alpha`` for the schedule when the file has no ``lycoris_config``
    metadata; ``lora_prefix`` when the network used a preset's ``lora_prefix``.
    """
    check_denoiser(denoiser)
    if sig_type not in SIG_TYPES:
        raise ValueError(f"sig_type must be one of {SIG_TYPES}, got {sig_type!r}")
    if not use_data_init:
        raise ValueError(
            f"{path}: use_data_init=False means the frozen base P₀, λ₀, Q₀ came from the SVD of a random matrix drawn "
            "with the unseeded global RNG, and LyCORIS does not save it: it cannot be rebuilt (LyCORIS's own loader "
            "silently uses the model weights instead, an error larger than the adapter's effect). Such a file "
            "cannot be loaded exactly; retrain with use_data_init=True or save the base tensors too"
        )
    modules = _group_modules(tensors, path)
    rank, scales = _rank_and_scales(modules, path)
    meta_cfg = _parse_lycoris_json(metadata[LYCORIS_CONFIG_KEY], str(path)) if LYCORIS_CONFIG_KEY in metadata else None
    if lycoris_config is not None:
        lyco_cfg, source = lycoris_config_of(lycoris_config, str(path)), "lycoris_config option"
    else:
        lyco_cfg, source = meta_cfg, f"'{LYCORIS_CONFIG_KEY}' metadata"
    schedule = schedule_config(path, rank, "paired", cfg, min_rank, alpha)
    if schedule is None and lyco_cfg is not None:
        schedule = _tlora_from_lycoris(lyco_cfg, rank, path, source)
    preset = (lyco_cfg or {}).get("apply_preset") or {}
    prefix = lora_prefix or (preset.get("lora_prefix") if isinstance(preset, dict) else None) or "lycoris"
    partial: dict[str, Any] = {
        "variant": "ortho", "layout": "paired", "rank": rank, "lora_rank": 2 * rank,
        "config": schedule.to_dict() if schedule else "needs cfg", "modules": sorted(modules),
    }
    if denoiser is None:
        raise NeedsInputError(
            f"{path}: a LyCORIS tlora file does not store its frozen base P₀, λ₀, Q₀; it is rebuilt from the base "
            "model's weights (as LyCORIS does at load), so pass the denoiser (or pipeline) it was trained on",
            "denoiser", partial,
        )
    found = _resolve_modules(denoiser, sorted(modules), prefix, path)
    for name, (module_path, module) in found.items():
        _check_layer(name, module_path, module, modules[name], path)
    if schedule is None:
        partial["modules"] = sorted(p for p, _ in found.values())
        raise NeedsInputError(
            f"{path}: no T-LoRA schedule: the file has no '{LYCORIS_CONFIG_KEY}' metadata. Pass "
            f"lycoris_config='path/to/lycoris_config.json' (SimpleTuner's, with tlora_min_rank/tlora_alpha), or "
            f"cfg=TLoRAConfig(max_rank={rank}, min_rank=..., alpha=..., layout='paired'), or min_rank=..., alpha=...",
            "cfg", partial,
        )
    notes = _precision_notes(path, modules, found, sig_type)
    bases = _rebuild_bases({name: m for name, (_, m) in found.items()}, rank, sig_type)
    state_dict: dict[str, torch.Tensor] = {}
    for name in sorted(found):
        module_path, module = found[name]
        p = modules[name]
        q, pw = p["q_layer.weight"], p["p_layer.weight"]
        p0, lam0, q0 = bases[name]
        a, b = paired_lora_factors(
            pw.reshape(pw.shape[0], rank), p["lambda_layer"], q.reshape(rank, -1), p0, lam0, q0, scales[name]
        )
        ones = (1,) * (q.ndim - 2)
        state_dict[f"{module_path}.lora_A.weight"] = a.reshape(2 * rank, -1, *ones)
        state_dict[f"{module_path}.lora_B.weight"] = b.reshape(-1, 2 * rank, *ones)
    meta = TLoRAFileMetadata(
        schedule, variant="ortho", base_model=type(denoiser).__name__, component=_component(denoiser),
        target_modules=tuple(sorted(p for p, _ in found.values())), source_format="lycoris",
    )
    return ConvertedTLoRA(state_dict, default_lora_config(state_dict, 2 * rank), meta, "lycoris", notes)


def _precision_notes(
    path: Path, modules: dict[str, dict[str, torch.Tensor]], found: dict[str, tuple[str, nn.Module]], sig_type: str
) -> list[str]:
    """Say (and warn) where the rebuilt base may differ from the one the adapter was trained against."""
    notes, inexact = [], []
    half = sorted({str(t.dtype) for p in modules.values() for t in p.values() if t.dtype in (torch.float16, torch.bfloat16)})
    if half:
        inexact.append(
            f"the file stores q/p/lambda in {', '.join(half)} while the frozen base is rebuilt in float32 from the "
            "model's weights, so the delta P·diag(λ)·Q − P₀·diag(λ₀)·Q₀ includes their rounding (and the model's "
            "weights may differ from those it was trained on)"
        )
    model_half = sorted({str(m.weight.dtype) for _, m in found.values() if m.weight.dtype in (torch.float16, torch.bfloat16)})
    if model_half:
        inexact.append(
            f"the model's weights are {', '.join(model_half)}: the base is exact only if the adapter was trained on "
            "these same weights"
        )
    if inexact:
        message = (
            f"{path}: the LyCORIS tlora base is rebuilt approximately: " + "; ".join(inexact)
            + ". LyCORIS's own loader (create_lycoris_from_weights) rebuilds it the same way."
        )
        warnings.warn(message, stacklevel=4)
        notes.append(message)
    notes.append(f"frozen base rebuilt by SVD of the base weights (sig_type={sig_type!r}, use_data_init=True)")
    if sig_type != "principal":
        notes.append(f"LyCORIS's own loader ignores sig_type and would rebuild a sig_type={sig_type!r} file as 'principal'")
    return notes


FORMAT = TLoRAFormat(
    "lycoris",
    "LyCORIS/SimpleTuner tlora: lycoris_<module>.{q_layer.weight,p_layer.weight,lambda_layer,alpha}; needs the base model",
    _is_lycoris_tlora,
    _convert_lycoris,
)
