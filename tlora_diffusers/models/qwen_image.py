"""Qwen-Image: ``QwenImagePipeline`` and ``QwenImageEditPipeline`` pass ``t / 1000``.

Both loops build ``timestep = t.expand(B).to(latents.dtype)`` and call the transformer with
``timestep=timestep / 1000`` (a ``(B,)`` tensor; diffusers 0.42.1
``pipelines/qwenimage/pipeline_qwenimage.py:643,647`` and ``pipeline_qwenimage_edit.py:770,774``);
the model multiplies by 1000 inside. True CFG (``true_cfg_scale > 1`` with negative
embeddings) is a second, separate call with the same timestep. Both set
``pipe._current_timestep = t`` (lines 641 and 763).
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="qwen-image",
    denoisers=("QwenImageTransformer2DModel",),
    timestep_arg="timestep",
    convention=conventions.FRACTION,
    pipeline_attrs=("transformer",),
    pipelines=("QwenImagePipeline", "QwenImageEditPipeline"),
    default_targets=(
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    ),
)
