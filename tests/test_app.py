"""The Gradio Space's handlers, called directly on the tiny offline model; one HTTP round trip."""

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LORA_TARGETS, add_lora, reference_rank
from peft import get_peft_model_state_dict

from tlora_diffusers import TLoRAConfig, TLoRAPatch, load_tlora
from tlora_diffusers.io import TLoRAFileMetadata, save_tlora
from tlora_diffusers.tiny import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
CFG = TLoRAConfig(8, 2, 1.5)


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("tlora_space_app", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    unet = tiny_pipeline("sdxl").unet
    add_lora(unet, "sdxl", rank=CFG.max_rank)
    meta = TLoRAFileMetadata(CFG, component="unet", target_modules=LORA_TARGETS["sdxl"])
    path = tmp_path_factory.mktemp("app") / "my_tlora.safetensors"
    return str(save_tlora(path, get_peft_model_state_dict(unet), meta, unet.peft_config["default"].to_dict()))


def arr(image):
    return np.asarray(image, dtype=np.int16)


@torch.no_grad()
def test_generate_masked_unmasked_schedule_and_clean_pipeline(app, lora_file):
    masked, unmasked, schedule, info = app.generate(app.TINY_MODEL, lora_file, "a sks dog", steps=3, seed=1)
    assert masked.size == unmasked.size == (256, 256)  # 64x64, shown 4x larger (nearest neighbour)
    assert np.abs(arr(masked) - arr(unmasked)).max() > 0
    assert schedule.width > 300 and schedule.mode == "RGB"
    assert "max_rank 8, min_rank 2, alpha 1.5" in info and "my_tlora.safetensors" in info
    ranks = [reference_rank(t, 8, 2, 1.5) for t in (667, 334, 1)]  # SDXL's "leading" steps at 3 steps
    assert f"**Active rank per step**: {', '.join(map(str, ranks))}" in info

    # The pipeline is shared by every user: the request left no adapter, hook or patched class.
    pipe = app.get_pipeline(app.TINY_MODEL)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and not hasattr(type(pipe), "_tlora_base_class")
    assert not getattr(pipe.unet, "peft_config", None)
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks

    # Parity: the same as the library used directly on an identical pipeline.
    ref = tiny_pipeline("sdxl", text_encoders=True)
    load_tlora(ref, lora_file)
    with TLoRAPatch(ref):
        expected = ref("a sks dog", num_inference_steps=3, generator=torch.Generator().manual_seed(1)).images[0]
    unpatched = ref("a sks dog", num_inference_steps=3, generator=torch.Generator().manual_seed(1)).images[0]
    assert np.array_equal(arr(masked), arr(app._display(expected)))
    assert np.array_equal(arr(unmasked), arr(app._display(unpatched)))
    assert np.array_equal(arr(masked)[::4, ::4], arr(expected))  # upscaling kept every pixel


def test_concurrent_requests_match_sequential_ones(app, lora_file):
    requests = [("a sks dog", 4), ("a red sks dog", 5)]
    sequential = [app.generate(app.TINY_MODEL, lora_file, p, steps=2, seed=s)[:2] for p, s in requests]
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def worker(i):
        try:
            barrier.wait()
            results[i] = app.generate(app.TINY_MODEL, lora_file, requests[i][0], steps=2, seed=requests[i][1])[:2]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for got, want in zip(results, sequential):
        assert all(np.array_equal(arr(g), arr(w)) for g, w in zip(got, want))


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"prompt": "  "}, ValueError, "write a prompt"),
        ({"lora_file": None}, ValueError, "upload a T-LoRA file"),
        ({"lora_file": "/nonexistent/x.safetensors"}, FileNotFoundError, "no such file"),
        ({"model_dir": "/nonexistent/model"}, ValueError, "no such folder"),
        ({"model_dir": ""}, ValueError, "choose a model"),
        ({"steps": 0}, ValueError, "steps must be >= 1"),
    ],
)
def test_user_errors(app, lora_file, kwargs, error, fragment):
    call = {"model_dir": app.TINY_MODEL, "lora_file": lora_file, "prompt": "a dog", "steps": 1, "seed": 0, **kwargs}
    with pytest.raises(error, match=fragment):
        app.generate(**call)
    assert not getattr(app.get_pipeline(app.TINY_MODEL).unet, "peft_config", None)


def test_the_default_is_the_shipped_scenes_model_with_its_example_tlora(app):
    """What a visitor sees first: the scenes model and the example T-LoRA, masked differs from unmasked."""
    assert app.EXAMPLE_TLORA.is_file(), "the example T-LoRA is shipped with the scenes weights"
    masked, unmasked, _, info = app.generate(app.SCENES_MODEL, str(app.EXAMPLE_TLORA), "a sks shape on a blue background",
                                             steps=8, seed=0, guidance=4.0)
    assert masked.size == (256, 256)  # 32x32, shown 8x larger
    assert "StableDiffusionPipeline" in info and "sks-shape-tlora.safetensors" in info
    assert np.abs(arr(masked) - arr(unmasked)).max() > 0
    assert not getattr(app.get_pipeline(app.SCENES_MODEL).unet, "peft_config", None)


def test_tiny_tlora_file_loads_on_the_tiny_model(app):
    path = app.tiny_tlora_file(max_rank=4, min_rank=1, alpha=2.0)
    masked, unmasked, _, info = app.generate(app.TINY_MODEL, path, "a dog", steps=2, seed=0)
    assert "max_rank 4, min_rank 1, alpha 2" in info and np.abs(arr(masked) - arr(unmasked)).max() > 0


def test_the_page_serves_generate_over_http(app, lora_file, monkeypatch, tmp_path):
    """Build the Blocks, launch on localhost, call the generate endpoint with gradio_client."""
    import gradio as gr
    from gradio_client import Client, handle_file

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    demo = app.build_demo()
    assert isinstance(demo, gr.Blocks)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        masked, unmasked, schedule, info = client.predict(
            app.TINY_MODEL, handle_file(lora_file), "a sks dog", 2, 1, "", 5.0, api_name="/generate"
        )
        assert all(Path(p).is_file() for p in (masked, unmasked, schedule)) and "max_rank 8" in info
        with pytest.raises(Exception, match="write a prompt"):  # gr.Error reaches the page as a message
            client.predict(app.TINY_MODEL, handle_file(lora_file), " ", 2, 1, "", 5.0, api_name="/generate")
        model, example, prompt, guidance = client.predict(api_name="/example_tlora")
        assert model == app.SCENES_MODEL and Path(example).name == app.EXAMPLE_TLORA.name and "sks shape" in prompt
    finally:
        demo.close()


def test_errors_on_the_page_name_the_uploaded_file_not_gradios_temporary_path(app, tmp_path):
    upload = "/tmp/gradio/0123456789abcdef0123456789abcdef/my_tlora.safetensors"
    error = ValueError(f"{upload}: unknown T-LoRA key layout\n  (e.g. x)")
    assert app.user_message(error, upload) == "my_tlora.safetensors: unknown T-LoRA key layout (e.g. x)"
    other = ValueError("/tmp/gradio/fedcba9876543210fedcba98/x.png: not a T-LoRA file (a PNG image)")
    assert app.user_message(other) == "x.png: not a T-LoRA file (a PNG image)"


def test_the_app_sends_no_analytics_and_chooses_its_threads(app):
    import os

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"  # set before gradio is imported
    assert app.THREADS == int(os.environ.get("TLORA_THREADS", "1")) == torch.get_num_threads()
