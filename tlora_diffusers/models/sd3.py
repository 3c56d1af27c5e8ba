"""SD3Transformer2DModel: the SD3 pipelines pass scheduler units (sigma * 1000) unchanged."""

from . import ModelAdapter, _register_builtin


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel


_register_builtin([(_sd3, ModelAdapter(timestep_arg="timestep", scale=1.0))])
