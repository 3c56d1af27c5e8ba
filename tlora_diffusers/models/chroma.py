"""Chroma: ``ChromaPipeline`` passes ``t / 1000``, as Flux does.

The loop builds ``timestep = t.expand(B).to(latents.dtype)`` and calls the transformer with
``timestep=timestep / 1000`` (a ``(B,)`` tensor; diffusers 0.42.1
``pipelines/chroma/pipeline_chroma.py:856,860``); CFG (``guidance_scale > 1``) is a second,
separate call with the same timestep (line 874). It sets ``pipe._current_timestep = t``
(line 851). Single-stream blocks have no ``attn.to_out``: their attention output and MLP
share ``proj_out``, targeted by a regex anchored on the block so the model's final
``proj_out`` stays out.
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="chroma",
    denoisers=("ChromaTransformer2DModel",),
    timestep_arg="timestep",
    convention=conventions.FRACTION,
    pipeline_attrs=("transformer",),
    pipelines=("ChromaPipeline",),
    default_targets=(
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        r"single_transformer_blocks\.\d+\.proj_mlp", r"single_transformer_blocks\.\d+\.proj_out",
    ),
)
