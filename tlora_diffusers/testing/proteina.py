"""Tiny RFD4-Proteina pipeline (``RFD4ProteinaTransformer``, protein backbones + local latents).

The denoiser keeps the real module names (``transformer_layers.N.mhba.mha.to_q/to_k/to_v/to_g/to_out``,
``transformer_layers.N.transition.transition.swish_linear.0/linear_out``, pair updates) and the
checkpoint's feature lists at 2 layers and widths 16; features whose conditioning tensors are not
given are zeros, as in the real pipeline. The ``RFD4ProteinaAutoencoder`` (decoder only runs, on the
final state) is 1 layer wide 16. The pipeline integrates two modalities, each with its own
``RFD4ProteinaScheduler`` (``bb_ca_scheduler``, ``local_latents_scheduler``); time runs from 0
(noise) to 1 (data), and the denoiser gets both times as ``bb_ca_time`` / ``local_latents_time``
(``(B,)``, in ``[0, 1]``). The number of steps is ``len(recycle_depths)`` (a pipeline config value:
each step also runs ``recycle_depths[i]`` trunk passes inside one denoiser call); here
``recycle_depths=[1, 1]``. The input is one 6-residue protein chain with an unspecified sequence.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import finish

_TOKENS = 6
_LATENT = 4  # local latent width (32 in the checkpoint)
_RESIDUES = 147
_TOKEN_TYPES = 7
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_g", "to_out", "transition.swish_linear.0", "transition.linear_out")


def _transformer():
    from diffusers import RFD4ProteinaTransformer

    return RFD4ProteinaTransformer(
        nlayers=2, token_dim=16, nheads=2, dim_cond=16, pair_repr_dim=8, latent_dim=_LATENT, token_type_emb_dim=4,
        cath_emb_dim=4, t_emb_dim=16, seq_sep_dim=4, xt_pair_dist_dim=4, tri_mult_c=8,
        num_sequence_classes=_RESIDUES, num_token_types=_TOKEN_TYPES,
    )


def _vae():
    from diffusers import RFD4ProteinaAutoencoder

    # Backbone atoms (N, CA, C, O) for every residue type; every type allowed for every token type.
    atom37 = [[slot < 4 for slot in range(37)] for _ in range(_RESIDUES)]
    allowed = [[True] * _RESIDUES for _ in range(_TOKEN_TYPES)]
    return RFD4ProteinaAutoencoder(
        atom37_mask=atom37, allowed_residue_types=allowed, latent_dim=_LATENT, n_residue_types=_RESIDUES,
        num_token_types=_TOKEN_TYPES, nlayers=1, token_dim=16, nheads=2, dim_cond=8, pair_repr_dim=8,
        token_type_emb_dim=4,
    )


def _schedulers() -> dict[str, Any]:
    from diffusers import RFD4ProteinaScheduler

    # No fine tail: the default 10 tail intervals need at least 20 steps.
    return dict(
        bb_ca_scheduler=RFD4ProteinaScheduler(schedule_mode="log", noise_mode="1/t", tsr_k=2.0, tsr_sigma=1.0,
                                              tail_steps=0),
        local_latents_scheduler=RFD4ProteinaScheduler(schedule_mode="power", noise_mode="tan", tsr_k=2.0,
                                                      tsr_sigma=1.0, tail_steps=0),
    )


def _build(seed: int) -> Any:
    from diffusers import RFD4ProteinaPipeline

    return finish(RFD4ProteinaPipeline(
        transformer=seeded(seed, _transformer), vae=seeded(seed, _vae), recycle_depths=[1, 1], **_schedulers(),
    ))


def _inputs(pipe: Any, seed: int) -> dict:
    ones = torch.ones(1, _TOKENS, dtype=torch.bool)
    atom37 = torch.zeros(1, _TOKENS, 37, dtype=torch.bool)
    atom37[..., :4] = True
    per_token = torch.zeros(1, _TOKENS, dtype=torch.long)
    conditioning = {
        "condition_sequence_1_residue": per_token.clone(),  # 0: unspecified, to be designed
        "molecule_iid": per_token.clone(), "molecule_entity_id": per_token.clone(),
        "condition_index-group_1_token": per_token.clone(),
        # |i - j| along the chain (the preprocessor's bond-graph distance for a single chain)
        "token_bond_path_length": (torch.arange(_TOKENS)[:, None] - torch.arange(_TOKENS)[None]).abs()[None],
    }
    # Interaction annotations the checkpoint's features require: none present.
    for name in ("hbond", "pistack", "pication", "saltbridge", "hydrophobic", "metal-coord"):
        conditioning[f"condition_{name}_1_atom"] = torch.zeros(1, _TOKENS, 37, dtype=torch.long)
    return dict(
        padding_mask=ones, is_in_context_conditioning=torch.zeros_like(ones), supports_local_latent=ones.clone(),
        token_type=per_token.clone(), atom37_mask=atom37, conditioning_features=conditioning,
        output_type="pt", generator=torch.Generator().manual_seed(seed),
    )


CASES = [TinyCase("rfd4-proteina", "rfd4-proteina", "RFD4ProteinaPipeline", _build, _inputs, _LORA_TARGETS)]
