"""torch.compile: the patched denoiser compiles once and never recompiles for a new timestep."""

import numpy as np
import pytest
import torch
from conftest import add_lora

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.tiny import tiny_pipeline, tiny_prompt_embeds


def run(pipe, steps):
    return pipe(**tiny_prompt_embeds(pipe), num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("kind", ["flux", "sdxl"])
def test_compiled_patched_denoiser_one_graph_no_recompiles(kind):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pipe = tiny_pipeline(kind)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    add_lora(denoiser, kind)
    with torch.no_grad(), TLoRAPatch(pipe, TLoRAConfig(8, 1)):
        eager = {steps: run(pipe, steps) for steps in (3, 5)}
        denoiser.compile(backend="aot_eager")
        counters.clear()
        first = run(pipe, 3)  # compiles
        graphs = counters["stats"]["unique_graphs"]
        assert not counters["graph_break"], dict(counters["graph_break"])
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = run(pipe, 5)  # five new timesteps: no recompilation allowed
        assert counters["stats"]["unique_graphs"] == graphs
    np.testing.assert_allclose(first, eager[3], atol=1e-5)
    np.testing.assert_allclose(second, eager[5], atol=1e-5)
    torch._dynamo.reset()


def test_compiled_per_token_masks_equal_eager():
    """Wan 2.2 TI2V passes one timestep per token: compiled, each token layer still gets its token's mask (the
    traced path once used the per-sample mask of the noisiest token for every token)."""
    from test_families import CASES, build, output

    case = CASES["wan2.2-ti2v-5b"]
    torch._dynamo.reset()
    pipe = build(case)
    with torch.no_grad(), TLoRAPatch(pipe, TLoRAConfig(8, 1)):
        eager = output(pipe(**case.inputs(pipe, 0)))
        pipe.transformer.compile(backend="aot_eager")
        compiled = output(pipe(**case.inputs(pipe, 0)))
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
