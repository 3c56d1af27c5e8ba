"""UNet2DConditionModel (SD 1.x/2.x, SDXL): timestep is scheduler units, positional or keyword."""

from . import ModelAdapter, _register_builtin


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel


_register_builtin([(_unet, ModelAdapter(timestep_arg="timestep", scale=1.0))])
