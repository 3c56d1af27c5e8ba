"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): the pipelines pass scheduler units unchanged.

``WanPipeline`` and ``WanImageToVideoPipeline`` (diffusers 0.42.1, ``pipelines/wan/pipeline_wan.py``
line 613, ``pipeline_wan_i2v.py`` line 773) pass ``timestep=t.expand(B)`` with ``t`` an entry of
``scheduler.timesteps`` (flow UniPC, int64), and set ``pipe._current_timestep = t`` (lines 595 / 752).
Wan 2.2 A14B calls ``transformer`` while ``t >= boundary_ratio * 1000`` and ``transformer_2`` below
(line 597). With ``expand_timesteps=True`` (Wan 2.2 TI2V-5B) they pass one timestep per token,
``(B, seq)``: ``mask[0][0][:, ::2, ::2] * t`` flattened (lines 609-611 / 768-770), so in
image-to-video the first latent frame's tokens get 0.
"""

from . import ModelFamily, conventions, token_layer_rule

FAMILY = ModelFamily(
    name="wan",
    denoisers=("WanTransformer3DModel",),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer", "transformer_2"),
    pipelines=("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"),
    # Self-attention, text cross-attention (+ the I2V image-context key/value) and the feed-forward.
    default_targets=(
        "to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2",
    ),
    # Rows are video tokens: self-attention, the cross-attention query and output, the
    # feed-forward and the output projection; not the cross-attention key/value (text and
    # image context rows) nor the condition embedder (one row per sample or per timestep).
    token_layers=token_layer_rule(
        r"(^|\.)blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_qkv|to_out\.0)($|\.)",
        r"(^|\.)blocks\.\d+\.attn2\.(to_q|to_out\.0)($|\.)",
        r"(^|\.)blocks\.\d+\.ffn\.net\.(0\.proj|2)($|\.)",
        r"(^|\.)proj_out($|\.)",
    ),
    video=True,
)
