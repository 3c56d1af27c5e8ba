"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): the pipeline passes scheduler units unchanged.

``HunyuanVideoPipeline`` (diffusers 0.42.1, ``pipelines/hunyuan_video/pipeline_hunyuan_video.py``
line 676) passes ``timestep=t.expand(B).to(latents.dtype)`` with ``t`` an entry of
``scheduler.timesteps`` (flow-matching Euler, float32), one call per step plus a separate
negative call when ``true_cfg_scale > 1``, and sets ``pipe._current_timestep = t`` (line 673).
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="hunyuan-video",
    denoisers=("HunyuanVideoTransformer3DModel",),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline"),
    # Double-stream attention (video and text projections) and feed-forwards, single-stream
    # attention and its fused MLP/output projections; regexes keep the text token refiner
    # (`context_embedder.token_refiner...attn.to_q`, ...) and the top-level `proj_out` out.
    default_targets=(
        r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
        r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
        r"single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)",
    ),
    video=True,
)
