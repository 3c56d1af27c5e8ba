"""LTX-Video (``LTXVideoTransformer3DModel``): the pipelines pass scheduler units unchanged.

``LTXPipeline`` (diffusers 0.42.1, ``pipelines/ltx/pipeline_ltx.py`` line 768) passes
``timestep=t.expand(B)`` with ``t`` an entry of ``scheduler.timesteps`` (flow-matching
Euler, float32) and ``B`` the CFG-doubled batch; ``LTXImageToVideoPipeline``
(``pipeline_ltx_image2video.py`` lines 840-841) passes one timestep per token, ``(B, seq)``:
``t.expand(B).unsqueeze(-1) * (1 - conditioning_mask)``, 0 on the conditioning frame's
tokens. Both set ``pipe._current_timestep = t`` (lines 762 / 834).
"""

from . import ModelFamily, conventions, token_layer_rule

FAMILY = ModelFamily(
    name="ltx-video",
    denoisers=("LTXVideoTransformer3DModel",),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
    default_targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    # Rows are video tokens: self-attention, the cross-attention query and output, the
    # feed-forward and the input/output projections; not the cross-attention key/value
    # (text rows), the caption projection nor the timestep embedding.
    token_layers=token_layer_rule(
        r"(^|\.)transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)($|\.)",
        r"(^|\.)transformer_blocks\.\d+\.attn2\.(to_q|to_out\.0)($|\.)",
        r"(^|\.)transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)($|\.)",
        r"(^|\.)(proj_in|proj_out)($|\.)",
    ),
    video=True,
)
