#!/usr/bin/env python3
"""Latency, memory and host overhead of T-LoRA rank masking against PEFT and LyCORIS.

One interleaved run per model: every variant of the denoiser is built once from the
same random weights, warmed up, then called round-robin (the order rotates every
repetition) so drifts in clock speed, caches or background load hit all variants
alike. Reported per variant: median per-call latency, IQR, ratio to ``base``, and
memory (weights + the peak of what the call allocates on top). Plus the host
overhead of ``TLoRAPatch`` with ~700 adapted layers and whole-pipeline seconds per
image for a 25-step run. Results: ``<out>/<name>.json``, ``.md`` and ``.png``.

See ``benchmarks/README.md`` for what each row means and the measured tables.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import copy
import functools
import gc
import importlib.metadata
import inspect
import json
import logging
import math
import os
import platform
import queue
import re
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from tlora_diffusers import ModelAdapter, TLoRAConfig, TLoRAPatch, register_model_adapter  # noqa: E402
from tlora_diffusers.schedule import lora_rank_mask  # noqa: E402

MODELS = ("sdxl", "flux", "flux2-klein")
SIZES = ("tiny", "mid", "full")
#: Image side in pixels per size; latents are 1/8 of it, Flux tokens (side/16)^2.
IMAGE_PX = {"tiny": 64, "mid": 128, "full": 1024}
#: Text tokens per size for the transformers (tiny/mid match tiny_prompt_embeds).
TEXT_TOKENS = {"tiny": 16, "mid": 16, "full": 512}
TARGET_MASK_VS_UNFUSED = 1.02
TARGET_FAST_VS_BASE = 1.03
TARGET_HOST_US = 100.0

# --------------------------------------------------------------------------- models
# Linear attention and feed-forward layers only, for every variant: LyCORIS tlora
# crashes on 3x3 convs, so all variants adapt the same layers. One regex per model
# serves PEFT (full match) and LyCORIS (re.match, anchored with $).
TARGETS = {
    "sdxl": r".*transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
            r"|.*transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
    "flux": r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
            r"|transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
            r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)",
    "flux2-klein": r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                   r"|transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out)"
                   r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)",
}

_SDXL_FULL = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
#: SDXL widths, one resnet + one transformer layer per level (7 transformer blocks, 70 layers).
_SDXL_MID = dict(_SDXL_FULL, sample_size=16, layers_per_block=1, transformer_layers_per_block=1)
#: FLUX.1 [dev]: 19 double + 38 single blocks, inner dim 3072, guidance embedding.
_FLUX_FULL = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
#: Real inner dim, one block of each type; in_channels 16 to match the tiny VAE's 4 latent channels.
_FLUX_MID = dict(_FLUX_FULL, in_channels=16, num_layers=1, num_single_layers=1)
#: FLUX.2 [klein] 4B: 5 double + 20 single blocks, inner dim 3072, Qwen3-4B text (3 x 2560), no guidance embedding.
_KLEIN_FULL = dict(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                   axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
_KLEIN_MID = dict(_KLEIN_FULL, in_channels=16, num_layers=1, num_single_layers=1)
CONFIGS = {
    ("sdxl", "mid"): _SDXL_MID, ("sdxl", "full"): _SDXL_FULL,
    ("flux", "mid"): _FLUX_MID, ("flux", "full"): _FLUX_FULL,
    ("flux2-klein", "mid"): _KLEIN_MID, ("flux2-klein", "full"): _KLEIN_FULL,
}


def build_denoiser(kind: str, size: str, seed: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised denoiser of ``kind`` at ``size`` on ``device``/``dtype``, in eval mode."""
    if size == "tiny":
        from tlora_diffusers.tiny import tiny_pipeline

        pipe = tiny_pipeline(kind, seed=seed)
        model = pipe.unet if kind == "sdxl" else pipe.transformer
        return model.to(device=device, dtype=dtype).eval()
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, UNet2DConditionModel

    cls = {"sdxl": UNet2DConditionModel, "flux": FluxTransformer2DModel, "flux2-klein": Flux2Transformer2DModel}[kind]
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # initialise directly in bf16 on the GPU: no fp32 copy of 12B params
        try:
            model = cls(**CONFIGS[(kind, size)])
        finally:
            torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


@dataclass
class CallInputs:
    """One denoiser call as its stock pipeline makes it, for each benchmark timestep."""

    kind: str
    args: tuple
    kwargs: dict
    timesteps: list[float]
    device: torch.device

    def for_t(self, t: float) -> tuple[tuple, dict]:
        if self.kind == "sdxl":  # 0-d float32 in scheduler units, 2nd positional (see FACTS.md)
            return (self.args[0], torch.tensor(float(t), device=self.device)), self.kwargs
        timestep = torch.full((1,), t / 1000.0, device=self.device)  # Flux/Flux2 pass t/1000 as (B,)
        return self.args, dict(self.kwargs, timestep=timestep)


def make_inputs(kind: str, size: str, model: nn.Module, timesteps: list[float], seed: int) -> CallInputs:
    """Random inputs shaped like the pipeline's call (SDXL: CFG batch of 2; Flux/Klein: batch 1)."""
    param = next(model.parameters())
    dev, dt = param.device, param.dtype
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dt)

    cfg = model.config
    latent = IMAGE_PX[size] // 8
    if kind == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[IMAGE_PX[size], IMAGE_PX[size], 0, 0, IMAGE_PX[size], IMAGE_PX[size]]] * 2)
        kwargs = dict(
            encoder_hidden_states=randn(2, 77, cfg.cross_attention_dim),
            added_cond_kwargs={"text_embeds": randn(2, pooled), "time_ids": time_ids.to(device=dev, dtype=dt)},
            return_dict=False,
        )
        return CallInputs(kind, (randn(2, cfg.in_channels, latent, latent),), kwargs, timesteps, dev)
    tokens, text = (latent // 2) ** 2, TEXT_TOKENS[size]
    kwargs: dict[str, Any] = dict(hidden_states=randn(1, tokens, cfg.in_channels),
                                  encoder_hidden_states=randn(1, text, cfg.joint_attention_dim), return_dict=False)
    if kind == "flux":
        kwargs.update(pooled_projections=randn(1, cfg.pooled_projection_dim),
                      img_ids=torch.zeros(tokens, 3, device=dev, dtype=dt),
                      txt_ids=torch.zeros(text, 3, device=dev, dtype=dt))
    else:
        kwargs.update(img_ids=torch.zeros(1, tokens, 4, device=dev, dtype=torch.long),
                      txt_ids=torch.zeros(1, text, 4, device=dev, dtype=torch.long))
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((1,), 3.5, device=dev, dtype=torch.float32)
    return CallInputs(kind, (), kwargs, timesteps, dev)


# ------------------------------------------------------------------------- variants


@dataclass
class Settings:
    size: str
    models: list[str]
    variants: list[str]
    device: torch.device
    dtype: torch.dtype
    threads: int
    clock: str
    rank: int
    min_rank: int
    alpha: float
    timesteps: list[float]
    timestep_range: bool
    warmup: int
    reps: int
    pipeline: bool
    pipeline_steps: int
    pipeline_warmup: int
    pipeline_reps: int
    host: bool
    host_layers: int
    host_reps: int
    lycoris_svd_init: bool
    memory_budget: Optional[float]
    seed: int
    out: Path
    name: str
    plot: bool

    @property
    def tlora(self) -> TLoRAConfig:
        return TLoRAConfig(max_rank=self.rank, min_rank=self.min_rank, alpha=self.alpha)


class Applied:
    """A variant applied to one denoiser copy: per-call work and the modules it added.

    ``shell``: a pipeline whose run must enclose the calls (``TLoRAPatch(fast=True)``
    merges for the length of one pipeline run); see :class:`CallWorker`.
    """

    def __init__(self, model: nn.Module, extra: tuple = (), patch: Optional[TLoRAPatch] = None,
                 before: Optional[Callable[[float], None]] = None, after: Optional[Callable[[], None]] = None,
                 layers: int = 0, shell: Any = None) -> None:
        self.model, self.extra, self.patch = model, extra, patch
        self.before, self.after, self.layers, self.shell = before, after, layers, shell

    def release(self) -> None:
        """Remove the patch: tlora_diffusers' registries keep a patched model alive until then."""
        if self.patch is not None:
            self.patch.remove()


def _add_peft(model: nn.Module, kind: str, s: Settings) -> int:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    model.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.rank, target_modules=TARGETS[kind], init_lora_weights=False))
    if s.dtype != torch.float32:
        # PEFT keeps adapter weights in fp32 next to a bf16 base by default; cast them as
        # a LoRA file loaded in the pipeline's dtype would be.
        model.to(dtype=s.dtype)
    return sum(isinstance(m, LoraLayer) for m in model.modules())


def _setup_base(model: nn.Module, kind: str, s: Settings) -> Applied:
    return Applied(model)


def _setup_peft(model: nn.Module, kind: str, s: Settings) -> Applied:
    return Applied(model, layers=_add_peft(model, kind, s))


def _setup_peft_fused(model: nn.Module, kind: str, s: Settings) -> Applied:
    layers = _add_peft(model, kind, s)
    model.fuse_lora()  # diffusers' model-level fuse: PEFT merge, the wrapper then calls base_layer only
    return Applied(model, layers=layers)


def _setup_tlora(model: nn.Module, kind: str, s: Settings) -> Applied:
    _add_peft(model, kind, s)
    patch = TLoRAPatch(model, s.tlora)
    return Applied(model, patch=patch, layers=len(patch.layer_names))


def _setup_tlora_fast(model: nn.Module, kind: str, s: Settings) -> Applied:
    """``fast=True`` works on pipelines only: patch a :class:`RunShell` around the denoiser."""
    _add_peft(model, kind, s)
    shell = RunShell(**{"unet" if kind == "sdxl" else "transformer": model, "scheduler": _scheduler(kind)})
    patch = TLoRAPatch(shell, s.tlora, fast=True)
    return Applied(model, patch=patch, layers=len(patch.layer_names), shell=shell)


def _scheduler(kind: str) -> Any:
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000) if kind == "sdxl" else \
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)


def _run_shell_class() -> type:
    from diffusers import DiffusionPipeline

    class RunShell(DiffusionPipeline):
        """A pipeline whose run is the function it is called with.

        ``TLoRAPatch(shell, cfg, fast=True)`` then wraps that function in one pipeline run,
        so bare denoiser calls inside it take the fast path, as a sampling loop's would.
        """

        def __init__(self, **modules: Any) -> None:
            super().__init__()
            self.register_modules(**modules)

        def __call__(self, body: Callable[[], Any]) -> Any:
            return body()

    return RunShell


def RunShell(**modules: Any) -> Any:  # noqa: N802 - a class, built lazily so --help does not import diffusers
    return _run_shell_class()(**modules)


class SelfTimed:
    """A runner's result that carries its own timing (the call ran on another thread)."""

    __slots__ = ("wall", "cpu", "value")

    def __init__(self, wall: float, cpu: float, value: Any = None) -> None:
        self.wall, self.cpu, self.value = wall, cpu, value


class CallWorker:
    """Makes every timed denoiser call of a group on one worker thread, inside a pipeline run if needed.

    ``TLoRAPatch(fast=True)`` keeps its merged state in a ContextVar of one pipeline call,
    so its calls must happen inside that call: the worker runs ``shell(serve)`` and serves
    requests from inside it. Calls of the other variants run in a copy of the context from
    before the run (``base_ctx``), so they neither see nor disturb the merged state. All
    variants run on the same thread and are timed there, on both clocks.
    """

    def __init__(self, shell: Any, device: torch.device) -> None:
        self.device = device
        self.requests: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._main, args=(shell,), daemon=True, name="tlora-bench-calls")
        self.thread.start()

    def _main(self, shell: Any) -> None:
        self.base_ctx = contextvars.copy_context()
        try:
            if shell is None:
                self._serve()
            else:
                shell(self._serve)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.results.put(("error", exc))

    def _serve(self) -> None:
        while True:
            request = self.requests.get()
            if request is None:
                return
            fn, what, in_run = request
            work = functools.partial(self._timed, fn) if what == "call" else \
                functools.partial(transient_peak_bytes, fn, self.device)
            try:
                self.results.put(("ok", work() if in_run else self.base_ctx.run(work)))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                self.results.put(("error", exc))

    def _timed(self, fn: Callable[[], Any]) -> "SelfTimed":
        _sync(self.device)
        cpu, wall = time.thread_time(), time.perf_counter()
        value = fn()
        _sync(self.device)
        return SelfTimed(time.perf_counter() - wall, time.thread_time() - cpu, value)

    def request(self, fn: Callable[[], Any], what: str, in_run: bool) -> Any:
        """Run ``fn`` on the worker: ``what="call"`` returns a :class:`SelfTimed`, ``"memory"`` peak bytes."""
        self.requests.put((fn, what, in_run))
        status, value = self.results.get()
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """End the pipeline run (the fast path restores the base weights here) and the thread."""
        self.requests.put(None)
        self.thread.join()
        while not self.results.empty():  # an error raised as the run ended
            status, value = self.results.get()
            if status == "error":
                raise value

@contextlib.contextmanager
def _lycoris_fast_init(enabled: bool):
    """Replace LyCORIS tlora's SVD initialisation by random factors of the same shapes.

    The SVD of every adapted weight costs seconds per 3072-wide layer on one CPU thread
    (7.4 s measured) and does not change what a forward computes, only the values.
    """
    if not enabled:
        yield
        return
    from lycoris.modules.tlora import TLoraModule

    original = TLoraModule._initialize_from_svd

    def random_init(self, org_module, in_dim, out_dim, flat_in_dim):
        if self.isconv:
            return original(self, org_module, in_dim, out_dim, flat_in_dim)
        r = self.lora_dim
        self.q_layer.weight.data = torch.randn(r, in_dim) / math.sqrt(in_dim)
        self.p_layer.weight.data = torch.randn(out_dim, r) / math.sqrt(r)
        self.lambda_layer.data = torch.linspace(1.0, 0.1, r).unsqueeze(0)

    TLoraModule._initialize_from_svd = random_init
    try:
        yield
    finally:
        TLoraModule._initialize_from_svd = original


def _setup_lycoris(model: nn.Module, kind: str, s: Settings, bypass: bool) -> Applied:
    import lycoris
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        # A preset file: create_lycoris takes preset names or paths only. TOML literal
        # strings keep the regex's backslashes.
        f.write(f"target_module = []\ntarget_name = ['(?:{TARGETS[kind]})$']\nuse_fnmatch = false\n")
    try:
        with _lycoris_fast_init(not s.lycoris_svd_init):
            net = lycoris.create_lycoris(model, 1.0, linear_dim=s.rank, linear_alpha=s.rank, algo="tlora",
                                         preset=f.name, bypass_mode=bypass)
    finally:
        os.unlink(f.name)
    net.apply_to()
    net.to(device=s.device, dtype=s.dtype)
    with torch.no_grad():
        for lora in net.loras:  # move off the initial state so the delta is not exactly zero
            lora.lambda_layer.mul_(1.01)
    cfg = s.tlora

    def before(t: float) -> None:  # SimpleTuner's apply_tlora_inference_mask: a CPU (1, R) mask, set globally
        set_timestep_mask(compute_timestep_mask(int(t), 1000, cfg.max_rank, cfg.min_rank, cfg.alpha))

    return Applied(model, extra=(net,), before=before, after=clear_timestep_mask, layers=len(net.loras))


def _fast_missing() -> Optional[str]:
    """``None`` when ``TLoRAPatch`` takes ``fast=True``, else why the variant cannot run."""
    if "fast" in inspect.signature(TLoRAPatch).parameters:
        return None
    return "not implemented: TLoRAPatch has no `fast` keyword"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    setup: Callable[[nn.Module, str, Settings], Applied]
    missing: Callable[[], Optional[str]] = lambda: None
    in_pipeline: bool = False
    #: resident memory in units of the base model's weights (copy + adapter + what stays allocated)
    memory: float = 1.1


VARIANTS = (
    Variant("base", "the denoiser without adapter", _setup_base, in_pipeline=True),
    Variant("peft_unfused", "PEFT LoRA, full rank, no mask (add_adapter)", _setup_peft, in_pipeline=True),
    Variant("peft_fused", "PEFT LoRA merged into the weights (fuse_lora)", _setup_peft_fused),
    Variant("tlora_mask", "PEFT LoRA + TLoRAPatch (per-call rank mask)", _setup_tlora, in_pipeline=True),
    Variant("tlora_fast", "PEFT LoRA + TLoRAPatch(fast=True) (active ranks merged, inside one pipeline run)",
            _setup_tlora_fast, _fast_missing, in_pipeline=True, memory=1.8),  # + saved base weights
    Variant("lycoris_default", "LyCORIS tlora, default mode, global mask per call",
            lambda m, k, s: _setup_lycoris(m, k, s, bypass=False), memory=1.3),  # + full-size deltas per call
    Variant("lycoris_bypass", "LyCORIS tlora, bypass_mode=True, global mask per call",
            lambda m, k, s: _setup_lycoris(m, k, s, bypass=True)),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


# ---------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: list[float], scale: float = 1e3) -> dict[str, float]:
    """Median, quartiles and IQR of ``seconds`` in ms (``scale=1e3``) or µs (``1e6``)."""
    xs = sorted(x * scale for x in seconds)
    if len(xs) == 1:
        q1 = q3 = xs[0]
    else:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(xs)}


@dataclass
class Timings:
    """Seconds per call on both clocks; ``primary`` is the one ratios use (see ``--clock``)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    clock: str = "wall"

    @property
    def primary(self) -> list[float]:
        return self.cpu if self.clock == "cpu" else self.wall


def paired_ratios(a: list[float], b: list[float]) -> dict[str, float]:
    """Quartiles of ``a[i] / b[i]``: calls of the same interleaved round, so shared drift cancels."""
    return summarize([x / y for x, y in zip(a, b, strict=True)], scale=1.0)


def interleaved(runners: dict[str, Callable[[int], Any]], warmup: int, reps: int,
                device: torch.device, clock: str) -> dict[str, Timings]:
    """Time each runner's calls round-robin, the start rotating (rep ``i`` starts at variant ``i``).

    Both clocks are read around every call: wall time (``perf_counter``, after a device
    sync on CUDA) and this thread's CPU time (``thread_time``), which excludes time the
    thread spent descheduled while other processes ran.
    """
    names = list(runners)
    for i in range(warmup):
        for name in names:
            runners[name](i)
    times = {name: Timings(clock=clock) for name in names}
    gc.collect()
    gc.disable()
    try:
        for i in range(reps):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                _sync(device)
                cpu, wall = time.thread_time(), time.perf_counter()
                out = runners[name](i)
                _sync(device)
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                if isinstance(out, SelfTimed):  # timed where it ran
                    wall, cpu = out.wall, out.cpu
                times[name].wall.append(wall)
                times[name].cpu.append(cpu)
    finally:
        gc.enable()
    return times


def transient_peak_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak bytes the call allocates on top of what was allocated before it.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: tracemalloc does not see
    torch, and RSS keeps freed pages, so the CPU allocator's alloc/free events are read
    from the torch profiler and summed in time order.
    """
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    except AttributeError:  # a torch without these profiler internals
        return None
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence kineto's C++ 'profiler_start/stop' lines (written to fd 2, not via Python)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def weight_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers."""
    seen: dict[int, int] = {}
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class Runner:
    """Calls one variant's denoiser on the worker; call ``k`` of this runner uses ``timesteps[k]``.

    ``memory()`` makes the next call under the allocator profiler instead of timing it.
    """

    def __init__(self, applied: Applied, inputs: CallInputs, worker: CallWorker) -> None:
        self.applied, self.inputs, self.worker = applied, inputs, worker
        self.calls = [inputs.for_t(t) for t in inputs.timesteps]
        self.count = 0

    def _call(self, k: int) -> Any:
        a = self.applied
        args, kwargs = self.calls[k % len(self.calls)]
        if a.before is not None:
            a.before(self.inputs.timesteps[k % len(self.calls)])
        try:
            with torch.no_grad():
                return a.model(*args, **kwargs)
        finally:
            if a.after is not None:
                a.after()

    def _next(self) -> int:
        self.count += 1
        return self.count - 1

    def __call__(self, i: int = 0) -> "SelfTimed":
        return self.worker.request(functools.partial(self._call, self._next()), "call", self.applied.shell is not None)

    def memory(self) -> Optional[int]:
        return self.worker.request(functools.partial(self._call, self._next()), "memory", self.applied.shell is not None)


def call_timesteps(s: Settings) -> list[float]:
    """Timestep of each call of a variant: ``A:B`` descends linearly over its calls, as a sampling
    run does (the active rank only grows, which the fast path relies on); ``a,b,...`` cycles."""
    n = s.warmup + s.reps + (0 if s.warmup else 1)
    if len(s.timesteps) == 2 and s.timestep_range:
        hi, lo = s.timesteps
        return [hi + (lo - hi) * k / max(n - 1, 1) for k in range(n)]
    return list(s.timesteps)


def _memory_budget(s: Settings) -> float:
    if s.memory_budget is not None:
        return s.memory_budget * 2**30
    if s.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(s.device)
        return 0.85 * free
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(re.search(r"MemAvailable:\s+(\d+)", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        return float("inf")
    return 0.75 * available


def plan_groups(names: list[str], base_bytes: float, budget: float) -> list[list[str]]:
    """Split variants into groups that fit in memory; ``base`` is measured in every group.

    Ratios are taken against the ``base`` of the same interleaved group. The pipeline
    variants come first, so the whole-pipeline run (after group 0) has them all.
    """
    size = {v.name: v.memory * base_bytes for v in VARIANTS}
    others = sorted((n for n in names if n != "base"),
                    key=lambda n: (not next(v for v in VARIANTS if v.name == n).in_pipeline, VARIANT_NAMES.index(n)))
    groups: list[list[str]] = [["base"]]
    used = size["base"]
    for name in others:
        if used + size[name] > budget and len(groups[-1]) > 1:
            groups.append(["base"])
            used = size["base"]
        if used + size[name] > budget:
            raise SystemExit(f"not enough memory for base + {name}: ~{(used + size[name]) / 2**30:.1f} GiB, "
                             f"budget {budget / 2**30:.1f} GiB (see --memory-budget-gib)")
        groups[-1].append(name)
        used += size[name]
    return groups


def bench_model(kind: str, s: Settings, log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """Per-call rows for every variant of ``kind``, then the pipeline rows."""
    start = time.perf_counter()
    template = build_denoiser(kind, s.size, s.seed, s.device, s.dtype)
    inputs = make_inputs(kind, s.size, template, call_timesteps(s), s.seed)
    base_bytes = weight_bytes(template)
    log(f"[{kind}] built {base_bytes / 2**20:.0f} MiB of weights in {time.perf_counter() - start:.1f} s")
    rows: list[dict] = []
    pipeline_rows: list[dict] = []
    selected = [v for v in VARIANTS if v.name in s.variants]
    runnable = []
    for v in selected:
        reason = v.missing()
        if reason:
            rows.append({"model": kind, "variant": v.name, "status": reason})
        else:
            runnable.append(v.name)
    groups = plan_groups(runnable, base_bytes, _memory_budget(s))
    failed: dict[str, str] = {}
    for g, group in enumerate(groups):
        applied: dict[str, Applied] = {}
        for name in group:
            variant = next(v for v in VARIANTS if v.name == name)
            t0 = time.perf_counter()
            try:
                model = template if name == "base" else copy.deepcopy(template)
                applied[name] = variant.setup(model, kind, s)
            except Exception as exc:  # report, do not hide: the row says what failed
                failed[name] = f"error: {type(exc).__name__}: {exc}"
                rows.append({"model": kind, "variant": name, "status": failed[name]})
                log(f"[{kind}] {name}: setup failed: {exc!r}")
                continue
            log(f"[{kind}] {name}: set up in {time.perf_counter() - t0:.1f} s ({applied[name].layers} layers)")
        shells = [a.shell for a in applied.values() if a.shell is not None]
        if len(shells) > 1:  # nested runs would see each other's state
            raise RuntimeError("at most one variant per group may need a pipeline run around its calls")
        worker = CallWorker(shells[0] if shells else None, s.device)
        runners = {name: Runner(a, inputs, worker) for name, a in applied.items()}
        t0 = time.perf_counter()
        try:
            # Memory: the first call of each variant runs under the allocator profiler (for
            # tlora_fast it includes saving the base weights and the first merge). It counts
            # as a warm-up call; without warm-up it is an extra call after the timed ones.
            transient = {name: run.memory() for name, run in runners.items()} if s.warmup else {}
            interleaved(runners, max(s.warmup - 1, 0), 0, s.device, s.clock)
            times = interleaved(runners, 0, s.reps, s.device, s.clock)
            if not s.warmup:
                transient = {name: run.memory() for name, run in runners.items()}
        finally:
            worker.close()
        log(f"[{kind}] group {g}: {len(runners)} variants x {s.warmup}+{s.reps} calls in {time.perf_counter() - t0:.1f} s")
        base_median = summarize(times["base"].primary)["median"]
        for name, a in applied.items():
            stats = summarize(times[name].primary)
            weights = weight_bytes(a.model, *a.extra)
            rows.append({
                "model": kind, "variant": name, "status": "ok", "group": g, "clock": s.clock,
                "median_ms": stats["median"], "q1_ms": stats["q1"], "q3_ms": stats["q3"], "iqr_ms": stats["iqr"],
                "wall_median_ms": summarize(times[name].wall)["median"],
                "cpu_median_ms": summarize(times[name].cpu)["median"],
                "n": stats["n"], "ratio_vs_base": stats["median"] / base_median,
                "paired_vs_base": paired_ratios(times[name].primary, times["base"].primary),
                "paired_vs_peft_unfused": paired_ratios(times[name].primary, times["peft_unfused"].primary)
                if "peft_unfused" in times else None,
                "adapted_layers": a.layers,
                "weights_mib": weights / 2**20,
                "transient_peak_mib": None if transient[name] is None else transient[name] / 2**20,
                "peak_mib": None if transient[name] is None else (weights + transient[name]) / 2**20,
            })
        if s.pipeline and g == 0:
            pipeline_rows = bench_pipeline(kind, s, applied, log, failed)
        for a in applied.values():
            a.release()
        del applied, runners, worker
        gc.collect()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    order = {n: i for i, n in enumerate(VARIANT_NAMES)}
    rows.sort(key=lambda r: (order[r["variant"]], r.get("group", 0)))
    unfused = next((r for r in rows if r["variant"] == "peft_unfused" and r["status"] == "ok"), None)
    for r in rows:
        if unfused is not None and r["status"] == "ok":
            # a ratio of base-normalised ratios: exact within one group, and valid across groups
            r["ratio_vs_peft_unfused"] = r["ratio_vs_base"] / unfused["ratio_vs_base"]
    return rows, pipeline_rows


# ------------------------------------------------------------------------- pipeline


def bench_pipeline(kind: str, s: Settings, applied: dict[str, Applied], log: Callable[[str], None],
                   failed: dict[str, str]) -> list[dict]:
    """Seconds per image of the stock pipeline, ``s.pipeline_steps`` steps, interleaved over variants.

    Each variant's denoiser is put into a tiny pipeline of ``kind`` (tiny VAE, prompt
    embeddings instead of text encoders); T-LoRA variants patch the *pipeline*, as users do.
    """
    from tlora_diffusers.tiny import tiny_pipeline, tiny_prompt_embeds

    names = [v.name for v in VARIANTS if v.in_pipeline and v.name in applied]
    pipes, calls = {}, {}
    px = IMAGE_PX[s.size]
    for name in names:
        a = applied[name]
        pipe = tiny_pipeline(kind, seed=s.seed, dtype=s.dtype)
        if s.device.type != "cpu":
            pipe.to(s.device)
        pipe.register_modules(**{"unet" if kind == "sdxl" else "transformer": a.model})
        if a.patch is not None:  # move the patch from the bare denoiser to the pipeline
            fast = {"fast": True} if name == "tlora_fast" else {}
            a.patch.remove()
            a.patch = TLoRAPatch(pipe, s.tlora, **fast)
        pipes[name] = pipe
        embeds = tiny_prompt_embeds(pipe, seed=s.seed)
        if kind == "flux2-klein":  # one call per step, as the distilled Klein runs (base Klein's CFG doubles it)
            embeds.pop("negative_prompt_embeds", None)
            embeds["guidance_scale"] = 1.0

        def call(i: int, pipe=pipe, embeds=embeds) -> Any:
            return pipe(**embeds, num_inference_steps=s.pipeline_steps, height=px, width=px, output_type="np",
                        generator=torch.Generator().manual_seed(s.seed))

        calls[name] = call
    t0 = time.perf_counter()
    times = interleaved(calls, s.pipeline_warmup, s.pipeline_reps, s.device, s.clock)
    log(f"[{kind}] pipeline: {len(calls)} variants x {s.pipeline_warmup}+{s.pipeline_reps} images "
        f"in {time.perf_counter() - t0:.1f} s")
    base = statistics.median(times["base"].primary)
    rows = []
    for name in names:
        stats = summarize(times[name].primary, scale=1.0)
        rows.append({"model": kind, "variant": name, "steps": s.pipeline_steps, "image_px": px, "clock": s.clock,
                     "median_s": stats["median"], "iqr_s": stats["iqr"], "n": stats["n"],
                     "wall_median_s": statistics.median(times[name].wall),
                     "cpu_median_s": statistics.median(times[name].cpu),
                     "ratio_vs_base": stats["median"] / base})
    for v in VARIANTS:
        if v.in_pipeline and v.name in s.variants and v.name not in names:
            why = v.missing() or failed.get(v.name) or "not run: not in the first memory group"
            rows.append({"model": kind, "variant": v.name, "status": why})
    return rows


# -------------------------------------------------------------------- host overhead


class HostOverheadNet(nn.Module):
    """A denoiser whose layers cost almost nothing: what remains is per-call host work."""

    def __init__(self, layers: int, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            sample = block(sample)
        return sample



#: SDXL's real layer layout (70 transformer blocks -> 700 attention/FF layers) at tiny widths.
_SDXL_LAYOUT = dict(
    _SDXL_FULL, sample_size=8, block_out_channels=(32, 64, 128), attention_head_dim=(2, 4, 8), norm_num_groups=8,
    cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
)


def _noop_hook(module: nn.Module, args: tuple, output: Any) -> None:
    return None


def _host_variants(model: nn.Module, kind: Optional[str], s: Settings, lora_regex: str) -> dict[str, Applied]:
    """``peft`` (no patch), ``noop_hooks`` (a do-nothing forward hook per LoRA layer), ``tlora_mask``."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    out = {}
    for name in ("peft", "noop_hooks", "tlora_mask"):
        m = copy.deepcopy(model)
        inject_adapter_in_model(LoraConfig(r=s.rank, lora_alpha=s.rank, target_modules=lora_regex,
                                           init_lora_weights=False), m)
        if s.device.type != "cpu" or s.dtype != torch.float32:
            m.to(device=s.device, dtype=s.dtype)
        layers = [l for l in m.modules() if isinstance(l, LoraLayer)]
        patch = None
        if name == "noop_hooks":
            for layer in layers:
                layer.lora_A["default"].register_forward_hook(_noop_hook)
        elif name == "tlora_mask":
            patch = TLoRAPatch(m, s.tlora)
        out[name] = Applied(m, patch=patch, layers=len(layers))
    return out


def _cuda_syncs(fn: Callable[[], Any]) -> int:
    """Device-to-host synchronisations one call makes (CUDA's sync debug mode, as warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_host(s: Settings, log: Callable[[str], None]) -> dict:
    """Host time the patch adds per denoiser call, with ~700 adapted layers.

    Wall time of a call is host time when the layers are trivially cheap; on CUDA
    kernels run asynchronously, so the time up to the return of ``forward`` is host
    work. Overhead = median(patched) - median(same model, same LoRA, unpatched).
    """
    from diffusers import UNet2DConditionModel

    t0 = time.perf_counter()
    register_model_adapter(HostOverheadNet, ModelAdapter(timestep_arg="timestep", scale=1.0))
    cfg = s.tlora
    sample_t = torch.tensor(500.0, device=s.device)
    cases = []
    torch.manual_seed(s.seed)
    models = [("synthetic-1", HostOverheadNet(1), r"blocks\.\d+", (torch.randn(1, 8),), None),
              (f"synthetic-{s.host_layers}", HostOverheadNet(s.host_layers), r"blocks\.\d+", (torch.randn(1, 8),), None)]
    unet = UNet2DConditionModel(**_SDXL_LAYOUT).eval()
    enc = torch.randn(2, 77, 64)
    sdxl_kwargs = {"encoder_hidden_states": enc, "added_cond_kwargs": {
        "text_embeds": torch.randn(2, 32), "time_ids": torch.zeros(2, 6)}, "return_dict": False}
    models.append(("sdxl-layout", unet, TARGETS["sdxl"], (torch.randn(2, 4, 8, 8),), sdxl_kwargs))
    for case, model, regex, args, kwargs in models:
        variants = _host_variants(model, None, s, regex)
        args = tuple(a.to(device=s.device, dtype=s.dtype) for a in args)
        kwargs = _to(kwargs or {}, s.device, s.dtype)

        def runner(a: Applied, sample: torch.Tensor = args[0], kwargs: dict = kwargs) -> Callable[[int], Any]:
            def run(i: int) -> Any:
                with torch.no_grad():
                    return a.model(sample, sample_t, **kwargs)
            return run

        runners = {name: runner(a) for name, a in variants.items()}
        reps = s.host_reps if case != "sdxl-layout" else max(3, s.host_reps // 4)
        times = interleaved(runners, max(2, s.warmup), reps, s.device, s.clock)
        med = {name: summarize(times[name].primary, scale=1e6) for name in runners}
        row = {"case": case, "layers": variants["tlora_mask"].layers, "reps": reps,
               **{f"{n}_us": med[n]["median"] for n in runners}, **{f"{n}_iqr_us": med[n]["iqr"] for n in runners},
               "overhead_us": med["tlora_mask"]["median"] - med["peft"]["median"],
               "noop_hook_overhead_us": med["noop_hooks"]["median"] - med["peft"]["median"]}
        if s.device.type == "cuda":
            row["cuda_syncs_peft"] = _cuda_syncs(functools.partial(runners["peft"], 0))
            row["cuda_syncs_tlora_mask"] = _cuda_syncs(functools.partial(runners["tlora_mask"], 0))
        if case == "sdxl-layout":
            patch = variants["tlora_mask"].patch
            row["check_us"] = _median_us(patch.check, 20, s.clock)
        cases.append(row)
        for a in variants.values():
            a.release()
        log(f"[host] {case}: {row['layers']} layers, overhead {row['overhead_us']:.0f} us/call")
    one, many = cases[0], cases[1]
    per_layer = (many["overhead_us"] - one["overhead_us"]) / max(many["layers"] - one["layers"], 1)
    hook_per_layer = (many["noop_hook_overhead_us"] - one["noop_hook_overhead_us"]) / max(many["layers"] - 1, 1)
    mask_us = _median_us(lambda: lora_rank_mask(sample_t, cfg, 1000), 200, s.clock)
    headline = many["overhead_us"]
    result = {
        "method": f"median {_CLOCK_WORDS[s.clock]} per call of the same LoRA model with and without TLoRAPatch, "
                  "interleaved; synthetic layers are Linear(8, 8) on a (1, 8) input, so the difference is host work",
        "clock": s.clock,
        "cases": cases,
        "fixed_us": one["overhead_us"],
        "per_layer_us": per_layer,
        "hook_dispatch_per_layer_us": hook_per_layer,
        "mask_build_us": mask_us,
        "check_per_pipeline_call_us": cases[-1].get("check_us"),
        "overhead_us": headline,
        "overhead_layers": many["layers"],
        "target_us": TARGET_HOST_US,
        "met": headline <= TARGET_HOST_US,
        "seconds": time.perf_counter() - t0,
    }
    return result


def _to(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _median_us(fn: Callable[[], Any], n: int, clock: str = "cpu") -> float:
    now = time.thread_time if clock == "cpu" else time.perf_counter
    for _ in range(3):
        fn()
    xs = []
    for _ in range(n):
        start = now()
        fn()
        xs.append(now() - start)
    return statistics.median(xs) * 1e6


_CLOCK_WORDS = {"cpu": "thread CPU time", "wall": "wall time"}


# -------------------------------------------------------------------------- report


def machine(s: Settings) -> dict:
    """What ran the benchmark: CPU, memory, accelerator, library versions, threads."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, AttributeError):
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20

    def version(dist: str) -> Optional[str]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = {
        "cpu": cpu, "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": None if mem is None else round(mem, 1), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": version("diffusers"),
        "peft": version("peft"), "lycoris-lora": version("lycoris-lora"), "tlora_diffusers": version("tlora_diffusers"),
        "torch_threads": torch.get_num_threads(), "device": str(s.device), "dtype": str(s.dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else None,
        "cuda": torch.version.cuda if s.device.type == "cuda" else None,
    }
    if info["tlora_diffusers"] is None:
        import tlora_diffusers

        info["tlora_diffusers"] = tlora_diffusers.__version__
    return info


def evaluate_targets(s: Settings, rows: list[dict], host: Optional[dict]) -> list[dict]:
    """The issue's three targets: met, not met, or not measured (with why)."""
    targets = []
    verdicts, measured = [], []
    for r in rows:
        if r["variant"] != "tlora_mask" or "ratio_vs_peft_unfused" not in r:
            continue
        p = r.get("paired_vs_peft_unfused")
        if p:  # same interleaved group: judge by the spread of the per-round ratios
            measured.append(f"{r['model']}: {p['median']:.3f} [{p['q1']:.3f}-{p['q3']:.3f}]")
            verdicts.append("met" if p["q3"] <= TARGET_MASK_VS_UNFUSED else
                            "not met" if p["q1"] > TARGET_MASK_VS_UNFUSED else "inconclusive")
        else:
            x = r["ratio_vs_peft_unfused"]
            measured.append(f"{r['model']}: {x:.3f}")
            verdicts.append("met" if x <= TARGET_MASK_VS_UNFUSED else "not met")
    status = "not measured" if not verdicts else "not met" if "not met" in verdicts else \
        "inconclusive (within noise)" if "inconclusive" in verdicts else "met"
    targets.append({
        "target": f"tlora_mask <= {TARGET_MASK_VS_UNFUSED} x peft_unfused per call "
                  "(median [q1-q3] of per-round ratios; met if q3 <= target, not met if q1 > target)",
        "measured": ", ".join(measured) or None, "status": status,
    })
    fast = [(r["model"], r["ratio_vs_base"]) for r in rows if r["variant"] == "tlora_fast" and r["status"] == "ok"]
    fast_missing = next((r["status"] for r in rows if r["variant"] == "tlora_fast" and r["status"] != "ok"), None)
    if s.size == "full" and s.device.type == "cuda" and fast:
        status = "met" if all(x <= TARGET_FAST_VS_BASE for _, x in fast) else "not met"
    else:
        why = []
        if fast_missing or not fast:
            why.append(fast_missing or "tlora_fast not run")
        if s.device.type != "cuda" or s.size != "full":
            why.append(f"the target is for a GPU at full size; this run is {s.size} on {s.device.type}")
        status = "not measured (" + "; ".join(why) + ")"
    targets.append({
        "target": f"tlora_fast <= {TARGET_FAST_VS_BASE} x base per call (GPU, full size)",
        "measured": ", ".join(f"{m}: {x:.3f}" for m, x in fast) or None, "status": status,
    })
    targets.append({
        "target": f"host overhead <= {TARGET_HOST_US:.0f} us per call (~700 adapted layers)",
        "measured": None if host is None else f"{host['overhead_us']:.0f} us at {host['overhead_layers']} layers",
        "status": "not measured" if host is None else ("met" if host["met"] else "not met"),
    })
    return targets


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def render_markdown(result: dict) -> str:
    m, st = result["machine"], result["settings"]
    out = [f"# T-LoRA benchmark: `{result['name']}`", ""]
    timesteps = (f"timesteps descending linearly from {st['timesteps'][0]:g} to {st['timesteps'][1]:g} over each "
                 "variant's calls (scheduler units; the active rank grows as in a sampling run)"
                 if st.get("timestep_range") else f"timesteps {st['timesteps']} (scheduler units) cycled per call")
    out += [f"Size `{st['size']}`, device `{m['device']}`, dtype `{m['dtype']}`, {m['torch_threads']} torch thread(s); "
            f"LoRA rank {st['rank']} (T-LoRA min_rank {st['min_rank']}, alpha {st['alpha']}); {timesteps}; "
            f"{st['warmup']} warm-up + {st['reps']} interleaved calls per variant. "
            f"Medians and ratios use **{_CLOCK_WORDS[st['clock']]}**"
            + (" (this thread's CPU time: time the process spent descheduled while other processes ran is not "
               "counted; wall-clock medians are listed too)" if st["clock"] == "cpu" else "") + ".", ""]
    out += ["## Machine", "", "| | |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in m.items()]
    out += ["", "## Per denoiser call", "",
            "Median time per call on the clock above; IQR = q3 - q1. `x base` = median / median of `base` in the "
            "same interleaved group, with [q1-q3] of the per-round ratios (call i of the variant / call i of base). "
            "Peak = weights (parameters + buffers, adapter included) + the most the call "
            "allocates on top (CPU: torch allocator events from the profiler; CUDA: max_memory_allocated).", ""]
    for kind in st["models"]:
        rows = [r for r in result["per_call"] if r["model"] == kind]
        out += [f"### {kind}", "", "| variant | median ms | IQR ms | wall median ms | x base | x peft_unfused | "
                "peak MiB | weights MiB | layers | status |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if r["status"] != "ok":
                out.append(f"| {r['variant']} | | | | | | | | | {r['status']} |")
                continue
            label = r["variant"] + (f" (group {r['group']})" if r["variant"] == "base" and r["group"] else "")
            pb = r["paired_vs_base"]
            out.append(f"| {label} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['wall_median_ms']:.2f} | "
                       f"{r['ratio_vs_base']:.3f} [{pb['q1']:.2f}-{pb['q3']:.2f}] | "
                       f"{_fmt(r.get('ratio_vs_peft_unfused'), 3)} | "
                       f"{_fmt(r['peak_mib'], 1)} | {r['weights_mib']:.1f} | {r['adapted_layers']} | ok |")
        if any(r.get("group") for r in rows):
            out += ["", "Variants ran in several memory groups, each interleaved with its own `base`; "
                    "`x base` uses that group's base."]
        out.append("")
    host = result.get("host_overhead")
    if host:
        out += ["## Host overhead of TLoRAPatch", "", host["method"] + ".", "",
                "| case | LoRA layers | peft us | noop hooks us | tlora_mask us | patch overhead us | "
                "hook-only overhead us |", "|---|---:|---:|---:|---:|---:|---:|"]
        for c in host["cases"]:
            out.append(f"| {c['case']} | {c['layers']} | {c['peft_us']:.0f} | {c['noop_hooks_us']:.0f} | "
                       f"{c['tlora_mask_us']:.0f} | {c['overhead_us']:.0f} | {c['noop_hook_overhead_us']:.0f} |")
        out += ["", f"- fixed per call (1 layer): {host['fixed_us']:.0f} us; per adapted layer: "
                f"{host['per_layer_us']:.2f} us, of which {host['hook_dispatch_per_layer_us']:.2f} us is torch's "
                "forward-hook dispatch alone",
                f"- building the mask (`lora_rank_mask`) alone: {host['mask_build_us']:.0f} us",
                f"- `TLoRAPatch.check()` (once per pipeline call, sdxl-layout): {_fmt(host['check_per_pipeline_call_us'], 0)} us",
                f"- **overhead at {host['overhead_layers']} layers: {host['overhead_us']:.0f} us per call** "
                f"(target <= {host['target_us']:.0f} us: {'met' if host['met'] else 'not met'})", ""]
        syncs = [c for c in host["cases"] if "cuda_syncs_tlora_mask" in c]
        if syncs:
            out += ["CUDA synchronisations per call (sync debug mode): " + ", ".join(
                f"{c['case']}: peft {c['cuda_syncs_peft']}, tlora_mask {c['cuda_syncs_tlora_mask']}" for c in syncs), ""]
    if result.get("pipeline"):
        out += ["## Whole pipeline", "", f"Seconds per image, {st['pipeline_steps']} steps, stock pipeline with "
                "tiny VAE and prompt embeddings (SDXL: CFG, batch 2 per call; Flux: guidance embedding; Klein: "
                "guidance_scale=1, one call per step), median of interleaved runs.", "",
                "| model | variant | image px | s / image | IQR s | wall s / image | x base | n |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["pipeline"]:
            if r.get("status"):
                out.append(f"| {r['model']} | {r['variant']} | | | | | | {r['status']} |")
                continue
            iqr = f"{r['iqr_s']:.3f}" if r["n"] > 1 else "-"
            out.append(f"| {r['model']} | {r['variant']} | {r['image_px']} | {r['median_s']:.3f} | {iqr} | "
                       f"{r['wall_median_s']:.3f} | {r['ratio_vs_base']:.3f} | {r['n']} |")
        out.append("")
    out += ["## Targets", "", "| target | measured | status |", "|---|---|---|"]
    out += [f"| {t['target']} | {_fmt(t['measured'])} | {t['status']} |" for t in result["targets"]]
    out += ["", f"Total run time: {result['seconds']:.0f} s.", ""]
    return "\n".join(out)


def render_plot(result: dict, path: Path) -> Optional[str]:
    """Grouped bars of per-call (and pipeline) ratio to base; returns why not, if no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    models = result["settings"]["models"]
    panels = [("per denoiser call", result["per_call"])]
    if result.get("pipeline"):
        panels.append((f"whole pipeline ({result['settings']['pipeline_steps']} steps)", result["pipeline"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (title, rows) in zip(axes[0], panels, strict=True):
        names = [n for n in VARIANT_NAMES if any(r["variant"] == n for r in rows)]
        width = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            for i, kind in enumerate(models):
                r = next((r for r in rows if r["model"] == kind and r["variant"] == name), None)
                x = i + (j - (len(names) - 1) / 2) * width
                if r is None or r.get("status", "ok") != "ok":  # includes pipeline rows with a status
                    ax.text(x, 0.05, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
                    continue
                ax.bar(x, r["ratio_vs_base"], width, color=colors(VARIANT_NAMES.index(name)),
                       label=name if i == 0 else None)
                ax.text(x, r["ratio_vs_base"], f"{r['ratio_vs_base']:.2f}", rotation=90, ha="center", va="bottom",
                        fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        if max((r.get("ratio_vs_base", 1.0) for r in rows), default=1.0) > 3:
            ax.set_yscale("log")  # keep 1.0-1.1 differences visible next to 10x ones
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel("median time / base" + (" (log)" if ax.get_yscale() == "log" else ""))
        ax.set_title(title)
        handles, labels = ax.get_legend_handles_labels()
        extra = [n for n in names if n not in labels]  # variants with no bar anywhere (e.g. not implemented)
        ax.legend(handles, [lb for lb in labels], fontsize=8, title="n/a: " + ", ".join(extra) if extra else None,
                  title_fontsize=7)
    m = result["machine"]
    fig.suptitle(f"{result['name']}: {m['cpu']}, {m['device']}, {m['dtype']}, {m['torch_threads']} thread(s), "
                 f"{_CLOCK_WORDS[result['settings']['clock']]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------- CLI

DEFAULTS = {  # size -> (rank, warmup, reps, pipeline warmup, pipeline reps, host reps)
    "tiny": (8, 3, 20, 1, 3, 200),
    "mid": (64, 1, 4, 0, 1, 100),
    "full": (64, 3, 10, 0, 0, 200),
}
QUICK = (8, 3, 30, 1, 3, 100)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
variants (rows): base, peft_unfused, peft_fused, tlora_mask, tlora_fast (enabled automatically
when TLoRAPatch accepts fast=True, otherwise reported as not implemented), lycoris_default,
lycoris_bypass. All adapt the same Linear attention/feed-forward layers.

sizes: tiny = tlora_diffusers.tiny denoisers; mid = real widths (SDXL 320/640/1280, Flux and
Flux2 Klein inner dim 3072) with one block per level/type and small latents, for a CPU;
full = real SDXL UNet / FLUX.1 [dev] / FLUX.2 [klein] 4B configs, random weights, bf16: needs CUDA.

examples:
  python benchmarks/bench.py --quick                      # tiny, CPU, under two minutes
  python benchmarks/bench.py --size mid                   # mid CPU run (results/mid-cpu.*)
  python benchmarks/bench.py --size full --device cuda    # GPU, bf16, full-size models
  python benchmarks/bench.py --size mid --models flux --variants base,peft_unfused,tlora_mask --reps 9
  python benchmarks/bench.py --quick --reps 2 --warmup 1 --pipeline-steps 2 --pipeline-reps 1 \\
      --host-reps 3 --host-layers 50 --out /tmp/bench       # about what tests/test_bench.py runs
""")
    parser.add_argument("--quick", action="store_true", help="the tiny CPU configuration with fewer repetitions "
                        "(under two minutes); name defaults to quick-<device>")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="model size (default: tiny)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--variants", default=",".join(VARIANT_NAMES),
                        help="comma-separated subset of the variants; base is always included")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available; default)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto", help="clock for medians and "
                        "ratios: cpu = this thread's CPU time (robust on a shared machine, needs --threads 1 on a "
                        "CPU device), wall = elapsed time (after a device sync on CUDA); auto: cpu for a CPU device "
                        "with one thread, else wall. Both are always recorded.")
    parser.add_argument("--rank", type=int, help="LoRA rank = T-LoRA max_rank (default: 8 tiny, 64 mid/full)")
    parser.add_argument("--min-rank", type=int, default=1, help="T-LoRA min_rank (default 1)")
    parser.add_argument("--alpha", type=float, default=1.0, help="T-LoRA schedule exponent (default 1.0)")
    parser.add_argument("--timesteps", default="600:400", help="scheduler-unit timesteps of the calls: A:B "
                        "descends linearly from A to B over each variant's calls, as in a sampling run, so the "
                        "active rank grows between calls (default 600:400, mid schedule); a,b,... cycles")
    parser.add_argument("--warmup", type=int, help="warm-up calls per variant (default: 3 tiny, 1 mid, 3 full)")
    parser.add_argument("--reps", type=int, help="timed calls per variant (default: 20 tiny, 4 mid, 10 full)")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the whole-pipeline run")
    parser.add_argument("--pipeline-steps", type=int, default=25, help="steps per image (default 25)")
    parser.add_argument("--pipeline-warmup", type=int, help="untimed images per variant (default: 1 tiny, 0 mid)")
    parser.add_argument("--pipeline-reps", type=int, help="timed images per variant (default: 3 tiny, 1 mid; "
                        "full: no pipeline run)")
    parser.add_argument("--no-host-overhead", action="store_true", help="skip the host-overhead measurement")
    parser.add_argument("--host-layers", type=int, default=700, help="adapted layers of the synthetic host "
                        "model (default 700, SDXL's attention+FF count)")
    parser.add_argument("--host-reps", type=int, help="timed calls per host-overhead variant (default: 100 mid and --quick, 200 otherwise)")
    parser.add_argument("--lycoris-svd-init", action="store_true", help="use LyCORIS tlora's own SVD "
                        "initialisation (slow: seconds per wide layer) instead of random factors of the same shapes")
    parser.add_argument("--memory-budget-gib", type=float, help="memory for resident variants; variants that do "
                        "not fit run in further groups, each with its own base (default: 75%% of available RAM / "
                        "85%% of free GPU memory)")
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output folder")
    parser.add_argument("--name", help="output file stem (default: <size>-<device>, or quick-<device>)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        args.size = "tiny"
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.size == "full" and device.type != "cuda":
        raise SystemExit("--size full builds the real SDXL/FLUX.1/FLUX.2 [klein] models (2.6-12B parameters) and "
                         "needs a CUDA GPU; use --size mid on a CPU")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rank, warmup, reps, p_warmup, p_reps, host_reps = QUICK if args.quick else DEFAULTS[args.size]
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    if clock == "cpu" and (device.type != "cpu" or args.threads != 1):
        raise SystemExit("--clock cpu measures only this thread: use it with --device cpu --threads 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name, given, allowed in (("--models", models, MODELS), ("--variants", variants, VARIANT_NAMES)):
        unknown = [x for x in given if x not in allowed]
        if unknown:
            raise SystemExit(f"{name}: unknown {unknown}; choose from {', '.join(allowed)}")
    if "base" not in variants:
        variants.insert(0, "base")
    pipeline_reps = p_reps if args.pipeline_reps is None else args.pipeline_reps
    return Settings(
        size=args.size, models=models, variants=variants, device=device, dtype=dtype, threads=args.threads,
        clock=clock,
        rank=args.rank or rank, min_rank=args.min_rank, alpha=args.alpha,
        timesteps=[float(t) for t in re.split("[:,]", args.timesteps)], timestep_range=":" in args.timesteps,
        warmup=warmup if args.warmup is None else args.warmup, reps=reps if args.reps is None else args.reps,
        pipeline=not args.no_pipeline and pipeline_reps > 0, pipeline_steps=args.pipeline_steps,
        pipeline_warmup=p_warmup if args.pipeline_warmup is None else args.pipeline_warmup,
        pipeline_reps=pipeline_reps, host=not args.no_host_overhead, host_layers=args.host_layers,
        host_reps=host_reps if args.host_reps is None else args.host_reps, lycoris_svd_init=args.lycoris_svd_init,
        memory_budget=args.memory_budget_gib, seed=args.seed, out=args.out,
        name=args.name or f"{'quick' if args.quick else args.size}-{device.type}", plot=not args.no_plot,
    )


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    s = settings_from(args)
    if s.reps < 1:
        raise SystemExit("--reps must be >= 1")
    torch.set_num_threads(s.threads)
    torch.set_flush_denormal(True)  # random deep nets drift into denormals, which are slow on x86
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
    start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    per_call: list[dict] = []
    pipeline: list[dict] = []
    for kind in s.models:
        rows, prows = bench_model(kind, s, log)
        per_call += rows
        pipeline += prows
    host = bench_host(s, log) if s.host else None
    result = {
        "name": s.name,
        "machine": machine(s),
        "settings": {
            "size": s.size, "models": s.models, "variants": s.variants, "rank": s.rank, "min_rank": s.min_rank,
            "alpha": s.alpha, "timesteps": s.timesteps, "timestep_range": s.timestep_range, "warmup": s.warmup, "reps": s.reps,
            "pipeline_steps": s.pipeline_steps, "pipeline_warmup": s.pipeline_warmup,
            "pipeline_reps": s.pipeline_reps if s.pipeline else 0, "host_layers": s.host_layers,
            "host_reps": s.host_reps, "clock": s.clock, "lycoris_init": "svd" if s.lycoris_svd_init else "random (same shapes)",
            "image_px": IMAGE_PX[s.size], "text_tokens": TEXT_TOKENS[s.size], "flush_denormal": True,
            "variant_descriptions": {v.name: v.description for v in VARIANTS},
        },
        "per_call": per_call,
        "host_overhead": host,
        "pipeline": pipeline,
    }
    if load_start is not None:  # other processes on the machine: wall times suffer, thread CPU time much less
        result["machine"]["load_average_1m_start_end"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]
    result["targets"] = evaluate_targets(s, per_call, host)
    result["seconds"] = time.perf_counter() - start
    s.out.mkdir(parents=True, exist_ok=True)
    stem = s.out / s.name
    plot_note = render_plot(result, stem.with_suffix(".png")) if s.plot else "--no-plot"
    if plot_note:
        result["plot"] = f"not written: {plot_note}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(result))
    print(render_summary(result))
    print(f"wrote {stem}.json, .md" + ("" if plot_note else ", .png"))
    return result


def render_summary(result: dict) -> str:
    """The console table: per-call ratio to base, per model."""
    lines = ["", f"per-call median ms and ratio vs base ({result['name']})"]
    models = result["settings"]["models"]
    lines.append(f"{'variant':<16}" + "".join(f"{m:>26}" for m in models))
    for name in VARIANT_NAMES:
        cells = []
        for kind in models:
            r = next((r for r in result["per_call"] if r["model"] == kind and r["variant"] == name), None)
            if r is None:
                cells.append(f"{'-':>26}")
            elif r["status"] != "ok":
                cells.append(f"{'not implemented' if r['status'].startswith('not impl') else 'error':>26}")
            else:
                cells.append(f"{r['median_ms']:>12.2f} ms {r['ratio_vs_base']:>7.3f}x")
        lines.append(f"{name:<16}" + "".join(cells))
    host = result.get("host_overhead")
    if host:
        lines.append(f"host overhead: {host['overhead_us']:.0f} us/call at {host['overhead_layers']} layers "
                     f"(fixed {host['fixed_us']:.0f} us + {host['per_layer_us']:.2f} us/layer)")
    for t in result["targets"]:
        lines.append(f"target: {t['target']}: {t['status']}" + (f" [{t['measured']}]" if t["measured"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
