"""Gradio Space: a T-LoRA's image with and without its timestep rank mask, and its rank schedule.

    pip install -r requirements-space.txt && python app.py

The model folder starts at the shipped scenes model (a small text-to-image model trained for
this project) with an example T-LoRA trained on it; any local diffusers folder works, and
``tiny:sdxl`` builds a tiny random SDXL offline. Environment: ``TLORA_MODEL`` (the folder
to start with), ``TLORA_DEVICE`` (default: ``cuda`` if available, else ``cpu``), ``TLORA_THREADS``
(torch CPU threads; default ``auto``: the CPUs this process may use minus those other
processes keep busy, so a shared 2-vCPU Space is not slowed down by threads spinning against
each other). Gradio's usage analytics are off: the app runs offline.

The handlers are plain functions (:func:`generate`, :func:`tiny_tlora_file`) so they can be
called and tested without a browser. Pipelines are cached per model folder and shared by
all users; a lock (and ``queue(default_concurrency_limit=1)``) lets one request at a time
load its T-LoRA onto a pipeline, patch, sample, unpatch and delete the adapter again.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import torch

from tlora_diffusers import TLoRAPatch, active_rank, load_tlora
from tlora_diffusers.cli._common import load_pipeline, model_dir as check_model_dir, quiet_libraries, resolve_device, \
    resolve_dtype
from tlora_diffusers.io.load import denoiser_of
from tlora_diffusers.plot import figure_to_image, rank_schedule_figure
from tlora_diffusers.scenes import EXAMPLE_TLORA, PIPELINE
from tlora_diffusers.threads import apply_threads

__all__ = ["TINY_MODEL", "SCENES_MODEL", "EXAMPLE_TLORA", "THREADS", "generate", "get_pipeline", "tiny_tlora_file",
           "user_message", "build_demo"]

#: The model name that builds a tiny random SDXL pipeline offline (for trying other models' code paths).
TINY_MODEL = "tiny:sdxl"
#: The shipped scenes model: the default (a real, small text-to-image model trained for this project).
SCENES_MODEL = str(PIPELINE)
#: LoRA targets of :func:`tiny_tlora_file` (attention of the tiny SDXL UNet).
TINY_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

#: Torch CPU threads for every request (TLORA_THREADS, default auto), chosen once at start.
THREADS = apply_threads()
_LOCK = threading.Lock()
_PIPELINES: dict[str, Any] = {}
_TINY_DIR: Optional[Path] = None


def _device() -> torch.device:
    return resolve_device(os.environ.get("TLORA_DEVICE", "auto"))


def get_pipeline(model_dir: str) -> Any:
    """The cached pipeline of a local diffusers folder, or of :data:`TINY_MODEL` (built once)."""
    global _TINY_DIR
    key = (model_dir or "").strip()
    if not key:
        raise ValueError(f"choose a model: a local diffusers folder, e.g. the shipped {SCENES_MODEL}, or {TINY_MODEL}")
    pipe = _PIPELINES.get(key)
    if pipe is None:
        path = key
        if key == TINY_MODEL:
            from tlora_diffusers.tiny import save_tiny_pipeline

            if _TINY_DIR is None:
                with quiet_libraries(verbose=False):
                    _TINY_DIR = save_tiny_pipeline("sdxl", tempfile.mkdtemp(prefix="tlora-tiny-sdxl-"))
            path = str(_TINY_DIR)
        check_model_dir(path, flag="model folder")
        device = _device()
        pipe = load_pipeline(path, device, resolve_dtype("auto", device))
        pipe.set_progress_bar_config(disable=True)
        _PIPELINES[key] = pipe
    return pipe


def _path(lora_file: Any) -> str:
    """Gradio gives a path (``type="filepath"``) or an object with ``.name``; tests pass paths."""
    path = getattr(lora_file, "name", lora_file)
    if not path:
        raise ValueError("upload a T-LoRA file (.safetensors), or take the example T-LoRA for the scenes model")
    return str(path)


def generate(
    model_dir: str,
    lora_file: Union[str, Path, Any],
    prompt: str,
    steps: int = 25,
    seed: int = 0,
    negative_prompt: str = "",
    guidance: Optional[float] = None,
) -> tuple[Any, Any, Any, str]:
    """Sample ``prompt`` with the T-LoRA masked and unmasked from the same seed.

    Returns ``(masked, unmasked, schedule, info)``: two PIL images, the rank-schedule plot
    (PIL) with this run's sampling steps marked, and a Markdown summary. Bad input raises
    ``ValueError``/``FileNotFoundError`` with a message meant for the user. The pipeline is
    left as it was found (adapter deleted, patch removed), also when sampling fails.
    """
    if not prompt or not prompt.strip():
        raise ValueError("write a prompt")
    steps, seed = int(steps), int(seed)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    path = _path(lora_file)
    with _LOCK:
        pipe = get_pipeline(model_dir)
        loaded = load_tlora(pipe, path)
        try:
            kwargs: dict[str, Any] = {"prompt": prompt, "num_inference_steps": steps, "output_type": "pil"}
            if negative_prompt:
                kwargs["negative_prompt"] = negative_prompt
            if guidance is not None:
                kwargs["guidance_scale"] = float(guidance)
            start = time.perf_counter()
            with TLoRAPatch(pipe, adapter_names=[loaded.adapter_name]):
                masked = pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).images[0]
            timesteps = pipe.scheduler.timesteps.detach().cpu().double()
            T = pipe.scheduler.config.num_train_timesteps
            middle = time.perf_counter()
            unmasked = pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).images[0]
            end = time.perf_counter()
        finally:
            denoiser_of(pipe).delete_adapters(loaded.adapter_name)
        figure = rank_schedule_figure(
            [loaded.config], num_train_timesteps=T, sampling_timesteps=timesteps,
            sampling_label=f"this run's {steps} steps",
        )
        schedule = figure_to_image(figure)
    cfg = loaded.config
    ranks = active_rank(timesteps, cfg, T).tolist()
    info = "\n".join([
        f"- **T-LoRA**: `{Path(path).name}` ({loaded.format}); max_rank {cfg.max_rank}, min_rank {cfg.min_rank}, "
        f"alpha {cfg.alpha:g}, layout {cfg.layout}",
        f"- **Model**: `{Path(model_dir).name or model_dir}` ({type(pipe).__name__}, {pipe.device}, "
        f"{str(pipe.dtype).replace('torch.', '')}, {THREADS} CPU thread{'s' * (THREADS != 1)})",
        f"- **Active rank per step**: {', '.join(map(str, ranks))}",
        f"- **Time**: masked {middle - start:.2f} s, unmasked {end - middle:.2f} s",
    ])
    return _display(masked), _display(unmasked), schedule, info


def _display(image: Any, at_least: int = 256) -> Any:
    """Small images (the scenes model's 32x32) upscaled by a whole factor, nearest neighbour, to be seen."""
    factor = max(1, -(-at_least // max(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), 0)


def tiny_tlora_file(max_rank: int = 8, min_rank: int = 1, alpha: float = 1.0, seed: int = 0) -> str:
    """A random T-LoRA file for the tiny model (``TINY_MODEL``), so the app can be tried offline."""
    from peft import LoraConfig, get_peft_model_state_dict

    from tlora_diffusers import TLoRAConfig
    from tlora_diffusers.io import TLoRAFileMetadata, save_tlora
    from tlora_diffusers.tiny import tiny_pipeline

    cfg = TLoRAConfig(int(max_rank), int(min_rank), float(alpha))
    unet = tiny_pipeline("sdxl").unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora = LoraConfig(r=cfg.max_rank, lora_alpha=cfg.max_rank, target_modules=TINY_TARGETS, init_lora_weights=False)
        unet.add_adapter(lora)
    meta = TLoRAFileMetadata(cfg, base_model="tiny-sdxl", component="unet", target_modules=TINY_TARGETS)
    folder = tempfile.mkdtemp(prefix="tlora-tiny-lora-")
    path = Path(folder) / "tiny_tlora.safetensors"
    return str(save_tlora(path, get_peft_model_state_dict(unet), meta, lora.to_dict()))


def user_message(error: BaseException, lora_file: Any = None) -> str:
    """One line for the page: Gradio's temporary upload paths (``/tmp/gradio/<hash>/x``) shown as the file's name."""
    text = " ".join(str(error).split())
    uploaded = _path(lora_file) if lora_file else None
    if uploaded:
        text = text.replace(uploaded, Path(uploaded).name)
    return re.sub(r"\S*/gradio/[0-9a-f]{16,}/(\S+)", r"\1", text)


def build_demo() -> Any:
    """The Gradio Blocks UI around :func:`generate`, queued one request at a time."""
    import gradio as gr

    def run(model_dir, lora_file, prompt, steps, seed, negative, guidance):
        try:
            return generate(model_dir, lora_file, prompt, steps, seed, negative, guidance)
        except (ValueError, OSError, TypeError) as e:  # user errors: shown in the page, not as a traceback
            raise gr.Error(user_message(e, lora_file)) from None

    with gr.Blocks(title="T-LoRA: masked vs unmasked") as demo:
        gr.Markdown(
            "# T-LoRA: timestep-dependent rank masking\n"
            "The same seed sampled twice: with the T-LoRA's rank mask (few ranks at high noise, all near "
            "t = 0) and unmasked (all ranks at every step). The plot shows the active rank per timestep "
            "and this run's sampling steps. The model starts at the shipped scenes model (32x32 scenes of "
            "shapes, trained for this project) with an example T-LoRA of a shape it had never seen (\"sks shape\")."
        )
        with gr.Row():
            with gr.Column(scale=1):
                model_dir = gr.Textbox(value=os.environ.get("TLORA_MODEL", SCENES_MODEL),
                                       label=f"model folder (diffusers layout; {TINY_MODEL} for a tiny random SDXL)")
                lora_file = gr.File(value=str(EXAMPLE_TLORA) if EXAMPLE_TLORA.is_file() else None,
                                    label="T-LoRA file (.safetensors)", type="filepath")
                with gr.Row():
                    example = gr.Button("example T-LoRA (scenes)", size="sm")
                    tiny = gr.Button(f"random T-LoRA (for {TINY_MODEL})", size="sm")
                prompt = gr.Textbox(value="a sks shape on a blue background", label="prompt")
                negative = gr.Textbox(label="negative prompt")
                steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                guidance = gr.Number(value=4.0, label="guidance scale")
                seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                go = gr.Button("generate", variant="primary")
            with gr.Column(scale=2):
                with gr.Row():
                    masked = gr.Image(label="T-LoRA (rank mask on)", type="pil", format="png")
                    unmasked = gr.Image(label="unmasked (all ranks at every step)", type="pil", format="png")
                schedule = gr.Image(label="rank schedule", type="pil", format="png")
                info = gr.Markdown()
        go.click(run, [model_dir, lora_file, prompt, steps, seed, negative, guidance],
                 [masked, unmasked, schedule, info], api_name="generate")
        example.click(lambda: (SCENES_MODEL, str(EXAMPLE_TLORA), "a sks shape on a blue background", 4.0), [],
                      [model_dir, lora_file, prompt, guidance], api_name="example_tlora")
        tiny.click(lambda: (TINY_MODEL, tiny_tlora_file(), "a photo of a sks dog"), [], [model_dir, lora_file, prompt],
                   api_name="tiny_tlora")
    return demo.queue(default_concurrency_limit=1)


if __name__ == "__main__":
    build_demo().launch()
