"""Mochi (``MochiTransformer3DModel``): the pipeline passes ``1000 - t`` (reversed: 1000 = clean).

Mochi's scheduler runs with ``invert_sigmas=True``, so ``scheduler.timesteps`` hold
``(1 - sigma) * 1000`` and ``MochiPipeline`` (diffusers 0.42.1, ``pipelines/mochi/pipeline_mochi.py``
line 649) passes that entry ``t`` as ``timestep=t.expand(B).to(latents.dtype)`` (float32, CFG-doubled
batch). It sets ``pipe._current_timestep = 1000 - t`` (line 646): the noise level in the usual
units (``sigma * 1000``, 0 = clean), which is what the convention returns; the raw
``scheduler.timesteps`` entry is itself reversed.
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="mochi",
    denoisers=("MochiTransformer3DModel",),
    timestep_arg="timestep",
    convention=conventions.REVERSED,
    pipeline_attrs=("transformer",),
    pipelines=("MochiPipeline",),
    # Joint attention: video projections, text-stream projections (`add_*_proj`,
    # `to_add_out`) and both feed-forwards. Names carry `attn1.` so that the caption
    # attention pool (`time_embed.pooler.to_q/to_kv/to_out`) stays out.
    default_targets=(
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn1.add_q_proj", "attn1.add_k_proj",
        "attn1.add_v_proj", "attn1.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2",
    ),
    video=True,
)
