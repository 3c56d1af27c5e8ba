"""Z-Image: ``ZImagePipeline`` passes ``(1000 - t) / 1000`` (reversed: 1 = clean) as ``t``.

The loop computes ``timestep = t.expand(B)`` then ``timestep = (1000 - timestep) / 1000``
(diffusers 0.42.1 ``pipelines/z_image/pipeline_z_image.py:510-511``) and passes it as the
second *positional* argument ``t`` of ``ZImageTransformer2DModel.forward`` (line 533), a
``(B,)`` tensor, ``(2B,)`` under CFG (``timestep.repeat(2)``: conditional and negative run
in one batched call). The pipeline does not set ``_current_timestep``.
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="z-image",
    denoisers=("ZImageTransformer2DModel",),
    timestep_arg="t",
    convention=conventions.REVERSED_FRACTION,
    pipeline_attrs=("transformer",),
    pipelines=("ZImagePipeline",),
    default_targets=(
        "to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
    ),
)
