"""Single-image (DreamBooth-style) T-LoRA training on accelerate, for every family with a recipe.

Training runs the stock pipeline's denoiser under :class:`~tlora_diffusers.TLoRAPatch`, so
each sample's LoRA ranks are masked by its own timestep (paper Sec. 3.1), and saves a file
that stock ``pipe.load_lora_weights`` loads.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..config import TLoRAConfig
from ..io.format import TLoRAFileMetadata, save_tlora
from ..ortho import SIG_TYPES
from ..patch import TLoRAPatch
from .card import check_hub_access, push_to_hub, write_model_card
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import file_digest, find_images, image_sizes, load_images, model_resolution
from .ortho import add_ortho_tlora, export_ortho_peft, ortho_layers, orthogonality_penalty, remove_ortho_tlora
from .recipes import recipe_for
from .targets import check_rank, default_targets, resolve_targets

__all__ = ["TrainConfig", "TrainResult", "train", "RUN_FILE"]

RUN_FILE = "tlora_train.json"
#: A pipeline folder needs this file (``DiffusionPipeline.save_pretrained`` writes it).
MODEL_INDEX = "model_index.json"
_RUN_MARKERS = (RUN_FILE, "pytorch_lora_weights.safetensors")
_VANILLA_ADAPTER = "tlora"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; validated before anything is loaded.

    Defaults follow the paper's single-image recipe scaled down (rank 16; the paper used
    rank 64, min_rank 32 for SDXL ortho and rank 32, min_rank 1 for Flux vanilla).
    """

    model: str
    images: Union[str, Sequence[str]]
    prompt: str
    output_dir: str
    resolution: Optional[int] = None
    steps: int = 800
    learning_rate: float = 1e-4
    rank: int = 16
    min_rank: int = 1
    alpha: float = 1.0
    variant: str = "vanilla"
    sig_type: str = "last"
    ortho_init: str = "random"
    ortho_reg: float = 1e-4
    lora_alpha: Optional[float] = None
    target_modules: Optional[Union[str, Sequence[str]]] = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    validation_prompts: Sequence[str] = field(default_factory=tuple)
    validation_steps: int = 25
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None

    def __post_init__(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(message)

        need(self.variant in ("vanilla", "ortho"), f"variant must be 'vanilla' or 'ortho', got {self.variant!r}")
        need(self.sig_type in SIG_TYPES, f"sig_type must be one of {SIG_TYPES}, got {self.sig_type!r}")
        need(self.ortho_init in ("random", "weight"), f"ortho_init must be 'random' or 'weight', got {self.ortho_init!r}")
        need(self.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        need(self.resolution is None or (isinstance(self.resolution, int) and not isinstance(self.resolution, bool)
                                         and self.resolution >= 16 and self.resolution % 16 == 0),
             f"resolution must be a multiple of 16 and >= 16 (or None: the model's), got {self.resolution!r}")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "validation_steps", "keep_checkpoints"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
        need(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
             f"checkpoint_every must be an int >= 0 (0: only at the end), got {self.checkpoint_every!r}")
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{name} must be > 0, got {value!r}")
        need(isinstance(self.ortho_reg, (int, float)) and math.isfinite(self.ortho_reg) and self.ortho_reg >= 0,
             f"ortho_reg must be >= 0, got {self.ortho_reg!r}")
        need(isinstance(self.prompt, str) and self.prompt.strip() != "", "prompt must be a non-empty string, e.g. 'a photo of sks dog'")
        need(not (self.resume and self.overwrite), "resume and overwrite exclude each other")
        need(self.hub_model_id is None or (isinstance(self.hub_model_id, str) and self.hub_model_id.count("/") == 1),
             f"hub_model_id must look like 'user/repo', got {self.hub_model_id!r}")
        need(self.hub_model_id is None or self.push_to_hub, "hub_model_id is only used with push_to_hub=True")
        TLoRAConfig(self.rank, self.min_rank, self.alpha)  # validates rank, min_rank, alpha with named errors
        object.__setattr__(self, "validation_prompts", tuple(self.validation_prompts))

    @property
    def tlora_config(self) -> TLoRAConfig:
        return TLoRAConfig(self.rank, self.min_rank, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["validation_prompts"] = list(self.validation_prompts)
        if not isinstance(self.images, str):
            d["images"] = [str(p) for p in self.images]
        return d


@dataclass
class TrainResult:
    output_file: Path
    steps: int
    losses: list[float]
    probe_loss_start: float
    probe_loss_end: float
    seconds: float
    validation_images: list[Path]
    #: False in the other processes of an ``accelerate launch`` run (only the main one writes files).
    main_process: bool = True
    #: What the run decided for you (e.g. the resolution the images were resized to).
    notes: list[str] = field(default_factory=list)


#: Settings that change the trained weights: a resumed run must share every one of them.
IDENTITY_KEYS = ("model", "images", "prompt", "resolution", "rank", "min_rank", "alpha", "variant", "sig_type",
                 "ortho_init", "ortho_reg", "lora_alpha", "target_modules", "batch_size",
                 "gradient_accumulation_steps", "mixed_precision", "max_grad_norm", "seed", "learning_rate")


def _identity(cfg: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (images by content)."""
    d = cfg.to_dict()
    out = {k: d[k] for k in IDENTITY_KEYS}
    out["images"] = [file_digest(p) for p in find_images(cfg.images)]
    out["num_processes"] = world_size
    return json.loads(json.dumps(out, default=str))


def _check_output_dir(cfg: TrainConfig) -> Path:
    """The output folder, checked before anything is loaded (nothing is created yet)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a folder")
    has_run = out.is_dir() and (any((out / m).exists() for m in _RUN_MARKERS) or latest_checkpoint(out) is not None)
    if cfg.resume and not (out / RUN_FILE).is_file():
        raise ValueError(f"resume: {out} holds no run to resume ({RUN_FILE} missing)")
    if not cfg.resume and has_run and not cfg.overwrite:
        raise ValueError(
            f"output_dir {out} already holds a training run; pass --resume to continue it or --overwrite to replace it"
        )
    if cfg.push_to_hub:
        check_hub_access(cfg.hub_model_id or out.resolve().name)
    return out


def _check_resume(cfg: TrainConfig, out: Path, world_size: int) -> int:
    """The step a resumed run continues from (0: a new run); its settings must be the run's."""
    done = 0
    if cfg.resume:
        run_file = out / RUN_FILE
        previous = json.loads(run_file.read_text())
        ours = _identity(cfg, world_size)
        diff = sorted(k for k in ours if previous["identity"].get(k) != ours[k])
        if diff:
            changes = ", ".join(f"{k} (was {previous['identity'].get(k)!r}, now {ours[k]!r})" for k in diff)
            raise ValueError(f"resume: settings that change the result differ from the run in {out}: {changes}")
        ckpt = latest_checkpoint(out)
        done = int(ckpt.name.split("-")[1]) if ckpt is not None else 0
        if done > cfg.steps:
            raise ValueError(
                f"resume: the run in {out} already trained {done} steps; pass steps >= {done} to continue it"
            )
    return done


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _load_pipeline(cfg: TrainConfig, pipe: Any) -> Any:
    if pipe is not None:
        return pipe
    from diffusers import DiffusionPipeline

    path = Path(cfg.model)
    if path.is_file() and path.name == MODEL_INDEX:
        path = path.parent
    if not (path / MODEL_INDEX).is_file():
        what = "no such folder" if not path.exists() else f"not a diffusers pipeline folder (no {MODEL_INDEX} in it)"
        raise FileNotFoundError(f"model {path}: {what}; pass a local folder written by save_pretrained")
    return DiffusionPipeline.from_pretrained(str(path))


def _slice_batch(batch: dict, target: torch.Tensor, keys: Sequence[str], total: int, rank: int,
                 size: int) -> tuple[dict, torch.Tensor]:
    """This process's share of a combined batch (every process draws the whole batch from the same RNG)."""
    if total == size:
        return batch, target
    part = slice(rank * size, (rank + 1) * size)
    return {k: v[part] if k in keys else v for k, v in batch.items()}, target[part]


def train(cfg: TrainConfig, pipe: Any = None) -> TrainResult:
    """Train a T-LoRA on a few instance images and save ``pytorch_lora_weights.safetensors``.

    ``pipe``: an already-built pipeline to train on instead of loading ``cfg.model`` (it is
    left as it was: adapters removed, patch removed). Under ``accelerate launch`` each
    process trains on its share of every batch of ``batch_size`` samples per process: the
    processes together draw exactly the batch one process with ``batch_size * N`` would.
    The output folder also gets a ``README.md`` model card.

    Example:
        >>> result = train(TrainConfig(model="./sdxl", images="./dog", prompt="a photo of sks dog",
        ...                            output_dir="./out", steps=800, rank=32))
        >>> pipe.load_lora_weights("./out"); TLoRAPatch(pipe)
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    started = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = _check_output_dir(cfg)
    files = find_images(cfg.images)
    pipe = _load_pipeline(cfg, pipe)
    notes: list[str] = []
    if cfg.resolution is None:
        cfg = dataclasses.replace(cfg, resolution=model_resolution(pipe))
    sizes = image_sizes(files)
    if any(min(size) != cfg.resolution for size in sizes):
        w, h = sizes[0]
        notes.append(f"the training images ({w}x{h}{', ...' if len(sizes) > 1 else ''}) are resized and centre-cropped "
                     f"to {cfg.resolution}x{cfg.resolution}, the "
                     + ("model's resolution" if cfg.resolution == model_resolution(pipe) else "requested resolution"))
    images = load_images(files, cfg.resolution)
    _check_resume(cfg, out, world)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run refused above leaves no folder behind
    if not cfg.progress:
        pipe.set_progress_bar_config(disable=True)
    recipe = recipe_for(pipe)
    denoiser = getattr(pipe, recipe.component)
    targets = resolve_targets(denoiser, cfg.target_modules or default_targets(denoiser))
    check_rank(denoiser, targets, cfg.rank)
    _release_accelerator_state(cfg.mixed_precision)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps, cpu=not torch.cuda.is_available())
    if accelerator.num_processes != world:
        raise ValueError(
            f"launched as {world} processes, but accelerate formed a group of {accelerator.num_processes} (FSDP "
            "without GPUs?), so every process would train alone and write the same files; launch with "
            "`accelerate launch --multi_gpu --num_processes N` (GPUs, or CPUs with gloo)"
        )
    pipe.to(accelerator.device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()

    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        cond = recipe.encode_prompt(pipe, cfg.prompt)
        encoded = recipe.encode_images(pipe, images).cpu()

    had_adapters = bool(getattr(denoiser, "peft_config", None))
    cleanup: list = []  # undo steps, run in reverse in `finally`: a failure at any point leaves the pipeline as it was
    try:
        if cfg.variant == "vanilla":
            from peft import LoraConfig

            lora_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha or cfg.rank, target_modules=targets,
                                     init_lora_weights=True)
            torch.manual_seed(cfg.seed)
            denoiser.add_adapter(lora_config, adapter_name=_VANILLA_ADAPTER)
            cleanup.append(lambda: _remove_vanilla(denoiser, had_adapters))
            adapter = _VANILLA_ADAPTER
        else:
            add_ortho_tlora(denoiser, targets, cfg.rank, sig_type=cfg.sig_type, init=cfg.ortho_init,
                            scale=(cfg.lora_alpha or cfg.rank) / cfg.rank, generator=torch.Generator().manual_seed(cfg.seed))
            cleanup.append(lambda: remove_ortho_tlora(denoiser))
            adapter = "ortho"
        params = _trainable(denoiser, cfg.variant)
        if cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
            cleanup.append(denoiser.disable_gradient_checkpointing)
        patch = TLoRAPatch(pipe, {adapter: cfg.tlora_config})
        cleanup.append(patch.remove)
        optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.learning_rate, weight_decay=1e-4)
        model, optimizer = accelerator.prepare(denoiser, optimizer)

        state: dict[str, Any] = {"losses": []}
        start_step = 0
        if cfg.resume and (ckpt := latest_checkpoint(out)) is not None:
            try:
                state = load_checkpoint(ckpt, params, optimizer, gen)
            except Exception as e:  # safetensors raises its own error type for corrupt files
                if isinstance(e, ValueError) and str(e).startswith(str(ckpt)):
                    raise
                raise ValueError(f"{ckpt}: cannot resume from this checkpoint ({type(e).__name__}: {e})") from None
            start_step = state["step"]
            accelerator.step = start_step  # where gradient accumulation stands
        identity = _identity(cfg, accelerator.num_processes)
        if accelerator.is_main_process:
            _write_json(out / RUN_FILE, {"identity": identity, "config": cfg.to_dict(), "status": "running"})

        ctx: dict[str, Any] = {}
        device = accelerator.device
        total = cfg.batch_size * accelerator.num_processes

        def loss_of(g: torch.Generator, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
            picks = torch.randint(0, encoded.shape[0], (total,), generator=g)
            batch, target, _ = recipe.sample(pipe, encoded[picks], g, ctx)
            if train:  # each process its share; the probe loss sees the whole batch on every process
                batch, target = _slice_batch(batch, target, recipe.batch_keys, total, accelerator.process_index,
                                             cfg.batch_size)
            kwargs = _move(recipe.forward_kwargs(pipe, cond, batch), device)
            with accelerator.autocast():
                pred = model(**kwargs, return_dict=False)[0]
            mse = torch.nn.functional.mse_loss(pred.float(), target.to(device).float())
            if train and cfg.variant == "ortho" and cfg.ortho_reg:
                return mse + cfg.ortho_reg * orthogonality_penalty(denoiser), mse
            return mse, mse

        def probe_loss() -> float:
            """Masked loss on a fixed set of noises and timesteps: comparable across the run."""
            g = torch.Generator().manual_seed(cfg.seed + 7919)
            model.eval()
            with torch.no_grad():
                value = sum(loss_of(g, False)[1].item() for _ in range(8)) / 8
            model.train()
            return value

        def checkpoint(step: int) -> None:
            if accelerator.is_main_process:
                pending = step % cfg.gradient_accumulation_steps != 0  # mid-accumulation: keep the summed grads
                saved = save_checkpoint(out, step, params, optimizer, gen,
                                        {"losses": state["losses"], "probe_loss_start": probe_start},
                                        cfg.keep_checkpoints, grads=pending)
                _save(saved, denoiser, cfg, targets, recipe.component)  # loadable as a T-LoRA, as in diffusers' scripts
            accelerator.wait_for_everyone()

        validation: list[Path] = []
        log_file = open(out / "logs.jsonl", "a", encoding="utf-8") if accelerator.is_main_process else None
        if log_file is not None:
            cleanup.append(log_file.close)
        writer = _tensorboard(out) if accelerator.is_main_process else None
        if writer is not None:
            cleanup.append(writer.close)
        probe_start = state.get("probe_loss_start") or probe_loss()
        model.train()
        bar = tqdm(total=cfg.steps, initial=start_step, disable=not cfg.progress or not accelerator.is_main_process,
                   desc="training LoRA" if cfg.min_rank == cfg.rank else "training T-LoRA")
        for step in range(start_step, cfg.steps):
            with accelerator.accumulate(model):
                # Each step in its own context: even a KeyboardInterrupt (which skips the
                # denoiser's post-hook) cannot leave this step's mask behind.
                loss, mse = contextvars.copy_context().run(loss_of, gen, True)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            value = mse.item()
            state["losses"].append(value)
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update(1)
            if log_file is not None:
                log_file.write(json.dumps({"step": step + 1, "loss": value, "lr": cfg.learning_rate}) + "\n")
                log_file.flush()
            if writer is not None:
                writer.add_scalar("loss", value, step + 1)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                checkpoint(step + 1)
                if accelerator.is_main_process:
                    validation += _validate(pipe, cfg, out, step + 1, recipe.component)
        bar.close()
        probe_end = probe_loss()
        if start_step < cfg.steps:
            checkpoint(cfg.steps)  # a finished run can be extended: --resume --steps N (N larger)
        if accelerator.is_main_process:
            output_file = _save(out, denoiser, cfg, targets, recipe.component)
            validation += _validate(pipe, cfg, out, cfg.steps, recipe.component)
            summary = {
                "identity": identity, "config": cfg.to_dict(), "status": "done", "steps": cfg.steps,
                "losses": state["losses"], "probe_loss_start": probe_start, "probe_loss_end": probe_end,
                "output_file": str(output_file), "seconds": time.perf_counter() - started,
            }
            _write_json(out / RUN_FILE, summary)
            write_model_card(out, cfg, type(pipe).__name__, type(denoiser).__name__, validation)
            if cfg.push_to_hub:
                repo = cfg.hub_model_id or f"{Path(cfg.output_dir).resolve().name}"
                try:
                    push_to_hub(out, repo)
                except Exception as e:
                    raise OSError(f"the upload to the Hub repo {repo} failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); the trained T-LoRA is saved in "
                                  f"{output_file}: upload it later with `hf upload {repo} {out}`") from None
        else:
            output_file = out / "pytorch_lora_weights.safetensors"
        accelerator.wait_for_everyone()
    finally:
        for undo in reversed(cleanup):
            undo()
    return TrainResult(output_file, cfg.steps, state["losses"], probe_start, probe_end,
                       time.perf_counter() - started, validation, accelerator.is_main_process, notes)


def _release_accelerator_state(mixed_precision: str) -> None:
    """Let a second ``train()`` in one process (a notebook) use another mixed precision.

    accelerate keeps one process-wide ``AcceleratorState`` and refuses a different
    ``mixed_precision`` later; the distributed ``PartialState`` is kept.
    """
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state()


def _trainable(denoiser: torch.nn.Module, variant: str) -> dict[str, torch.nn.Parameter]:
    """This run's adapter parameters only (never a LoRA the user had loaded before), in float32."""
    if variant == "vanilla":
        params = {n: p for n, p in denoiser.named_parameters() if f".{_VANILLA_ADAPTER}." in n and "lora_" in n}
    else:
        params = {f"{path}.{n}": getattr(layer, n) for path, layer in ortho_layers(denoiser).items()
                  for n in layer.adapter_param_names}
    for p in params.values():
        p.requires_grad_(True)
        p.data = p.data.float()
    return params


def _remove_vanilla(denoiser: torch.nn.Module, had_adapters: bool) -> None:
    if had_adapters:
        denoiser.delete_adapters(_VANILLA_ADAPTER)
    else:
        denoiser.unload_lora()  # no LoRA before training: remove PEFT's layer wrappers too


def _save(out: Path, denoiser: torch.nn.Module, cfg: TrainConfig, targets: list[str], component: str) -> Path:
    if cfg.variant == "vanilla":
        from peft import get_peft_model_state_dict

        state_dict = get_peft_model_state_dict(denoiser, adapter_name=_VANILLA_ADAPTER)
        lora_config = denoiser.peft_config[_VANILLA_ADAPTER].to_dict()
        tcfg = cfg.tlora_config
    else:
        state_dict, lora_config = export_ortho_peft(denoiser)
        tcfg = TLoRAConfig(cfg.rank, cfg.min_rank, cfg.alpha, layout="paired")
    meta = TLoRAFileMetadata(tcfg, variant=cfg.variant, base_model=type(denoiser).__name__, component=component,
                             target_modules=tuple(targets), source_format="tlora_diffusers")
    return save_tlora(out, state_dict, meta, lora_config)


def _validate(pipe: Any, cfg: TrainConfig, out: Path, step: int, component: str) -> list[Path]:
    """Validation images through the stock pipeline, masked by the training patch."""
    if not cfg.validation_prompts:
        return []
    folder = out / "validation"
    folder.mkdir(exist_ok=True)
    denoiser = getattr(pipe, component)
    was_training = denoiser.training
    denoiser.eval()
    paths = []
    try:
        for i, prompt in enumerate(cfg.validation_prompts):
            image = pipe(prompt=prompt, num_inference_steps=cfg.validation_steps, height=cfg.resolution,
                         width=cfg.resolution, generator=torch.Generator().manual_seed(cfg.seed + i)).images[0]
            path = folder / f"step-{step:06d}-{i}.png"
            image.save(path)
            paths.append(path)
    finally:
        denoiser.train(was_training)
    return paths


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))
