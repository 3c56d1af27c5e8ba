"""Train the scenes family from scratch: evaluator, VAE, then text encoder + UNet (seeded).

    python -m tlora_diffusers.scenes.build --out tlora_diffusers/scenes/weights --threads 2

Stages run in order and each is skipped when its output exists (``--force STAGE`` redoes
one); the base stage checkpoints every ``--eval-every`` steps and resumes from its last
checkpoint. Each stage appends JSON lines to ``train_log.jsonl``. The base model is
trained on :data:`~tlora_diffusers.scenes.data.BASE_SHAPES` only. When done, the folder
holds a stock ``StableDiffusionPipeline`` (``pipeline/``), the evaluator, the log and
``SHA256SUMS``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .data import ATTRIBUTES, BASE_SHAPES, SHAPES, caption, render, sample_scene
from .models import SceneEvaluator, build_scheduler, build_text_encoder, build_unet, build_vae

__all__ = ["main", "scene_batches", "augment"]


def _log(out: Path, **record: Any) -> None:
    record = {"time": round(time.time(), 1), **record}
    with open(out / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def scene_batches(seed: int, batch: int, shapes=BASE_SHAPES, drop: float = 0.0) -> Iterator[tuple]:
    """Endless ``(images in [-1, 1], labels, captions)`` batches from one seeded stream."""
    rng = random.Random(seed)
    while True:
        scenes = [sample_scene(rng, shapes) for _ in range(batch)]
        images = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
        labels = {a: torch.tensor([s.labels()[a] for s in scenes]) for a in ATTRIBUTES}
        yield images, labels, [caption(s, rng, drop) for s in scenes]


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise and brightness jitter: generated images are softer and noisier than renders."""
    b = images.shape[0]
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]) / 16
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * blurred + (1 - pick) * images
    x = x * (1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5))
    x = x + torch.randn(x.shape, generator=gen) * 0.12 * torch.rand(b, 1, 1, 1, generator=gen)
    return x.clamp(-1, 1)


def _cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -- evaluator --------------------------------------------------------------------------------


def train_evaluator(out: Path, steps: int, seed: int) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = SceneEvaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    batches = scene_batches(seed + 1, 128, SHAPES)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, 200, 2e-3)
        images, labels, _ = next(batches)
        logits = model(augment(images, gen))
        loss = sum(F.cross_entropy(logits[a], labels[a]) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            _log(out, stage="evaluator", step=step + 1, loss=round(loss.item(), 4))
    model.eval()
    accuracy = evaluator_accuracy(model, seed + 2)
    _log(out, stage="evaluator", done=True, held_out_accuracy=accuracy)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "evaluator.safetensors"))


@torch.no_grad()
def evaluator_accuracy(model: SceneEvaluator, seed: int, n: int = 2048, augmented: bool = True) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    batches = scene_batches(seed, 256, SHAPES)
    hits = {a: 0 for a in ATTRIBUTES}
    for _ in range(n // 256):
        images, labels, _ = next(batches)
        logits = model(augment(images, gen) if augmented else images)
        for a in ATTRIBUTES:
            hits[a] += int((logits[a].argmax(-1) == labels[a]).sum())
    return {a: round(h / n, 4) for a, h in hits.items()}


# -- VAE --------------------------------------------------------------------------------------


def train_vae(out: Path, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    batches = scene_batches(seed + 3, 32, SHAPES)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, 200, 1e-3)
        images, _, _ = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dist = vae.encode(images).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
            recon = vae.decode(z).sample
        rec = F.mse_loss(recon.float(), images)
        kl = dist.kl().mean() / (images[0].numel())
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            _log(out, stage="vae", step=step + 1, mse=round(rec.item(), 5), kl=round(kl.item(), 4))
    vae.eval()
    with torch.no_grad():
        images, _, _ = next(scene_batches(seed + 4, 512, SHAPES))
        dist = vae.encode(images).latent_dist
        std = float(dist.mean.std())
        mse = float(F.mse_loss(vae.decode(dist.mean).sample, images))
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    _log(out, stage="vae", done=True, latent_std=std, scaling_factor=vae.config.scaling_factor, recon_mse=mse)
    vae.save_pretrained(out / "pipeline" / "vae")


# -- base: text encoder + UNet ----------------------------------------------------------------


def _save_state(path: Path, step: int, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
                rng_state: dict) -> None:
    """A resumable checkpoint (written to a temp file and renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": step, "modules": {k: m.state_dict() for k, m in modules.items()},
                "optimizer": opt.state_dict(), "rng": rng_state}, tmp)
    os.replace(tmp, path)


def _pipeline(vae, text_encoder, tokenizer, unet, prediction_type: str = "epsilon",
              zero_terminal_snr: bool = False) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=build_scheduler("ddim", prediction_type, zero_terminal_snr),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _encoded_dataset(vae, seed: int, size: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """``size`` base-shape scenes and their VAE latent moments (float16), encoded once."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, BASE_SHAPES) for _ in range(size)]
    means, stds = [], []
    for i in range(0, size, 256):
        chunk = scenes[i:i + 256]
        images = torch.from_numpy(np.stack([render(s) for s in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1
        dist = vae.encode(images).latent_dist
        means.append(dist.mean.half())
        stds.append(dist.std.half())
    return scenes, torch.cat(means), torch.cat(stds)


def train_base(out: Path, steps: int, seed: int, batch: int, eval_every: int, lr: float,
               dataset_size: int = 100_000, prediction_type: str = "epsilon", init_from: Optional[Path] = None,
               stop_after: Optional[int] = None, checkpoint_name: str = "base_checkpoint.pt",
               zero_terminal_snr: bool = False, high_noise_share: float = 0.0, high_noise_from: int = 700) -> None:
    """Text encoder + UNet, DDPM loss with ``prediction_type`` targets, EMA weights saved.

    ``init_from``: start from the EMA weights of another run's checkpoint (a fresh optimizer and
    schedule). ``stop_after``: end after that many steps (checkpointed), as if interrupted.
    ``high_noise_share``: that share of each batch draws t from ``[high_noise_from, 1000)``
    instead of ``[0, 1000)``: the layout (where the object goes) is decided there, from the
    prompt alone, and uniform sampling leaves it undertrained.
    """
    from diffusers import AutoencoderKL

    from .evaluate import load_evaluator, prompt_following
    from .tokenizer import scenes_tokenizer

    tokenizer = scenes_tokenizer(out / "pipeline" / "tokenizer")
    tokenizer.save_pretrained(out / "pipeline" / "tokenizer")
    vae = AutoencoderKL.from_pretrained(out / "pipeline" / "vae").eval().requires_grad_(False)
    torch.manual_seed(seed)
    text_encoder, unet = build_text_encoder(len(tokenizer)), build_unet()
    ema = {"text_encoder": copy.deepcopy(text_encoder).eval().requires_grad_(False),
           "unet": copy.deepcopy(unet).eval().requires_grad_(False)}
    live = {"text_encoder": text_encoder, "unet": unet}
    params = [p for m in live.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = build_scheduler("ddpm", prediction_type, zero_terminal_snr)
    alphas = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    ckpt = out / checkpoint_name
    start = 0
    if init_from is not None and not ckpt.is_file():
        warm = torch.load(init_from, map_location="cpu", weights_only=True)["modules"]
        for k in live:
            live[k].load_state_dict(warm["ema_" + k])
            ema[k].load_state_dict(warm["ema_" + k])
        _log(out, stage="base", warm_start=str(init_from), prediction_type=prediction_type,
             zero_terminal_snr=zero_terminal_snr, high_noise_share=high_noise_share, high_noise_from=high_noise_from)
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        for k, m in live.items():
            m.load_state_dict(state["modules"][k])
        for k, m in ema.items():
            m.load_state_dict(state["modules"]["ema_" + k])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"]["generator"])
        start = state["step"]
        _log(out, stage="base", resumed_from=start)
    scenes, mean, std = _encoded_dataset(vae, seed + 5, dataset_size)
    _log(out, stage="base", dataset=len(scenes))
    evaluator = load_evaluator(out)
    text_encoder.train()
    unet.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, 500, lr)
        rng = random.Random(seed * 1_000_003 + step)
        picks = torch.randint(0, len(scenes), (batch,), generator=gen)
        unconditional = (torch.rand(batch, generator=gen) < 0.1).tolist()  # for classifier-free guidance
        captions = ["" if u else caption(scenes[i], rng, 0.25) for u, i in zip(unconditional, picks.tolist())]
        ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
        m, sd = mean[picks].float(), std[picks].float()
        latents = (m + sd * torch.randn(m.shape, generator=gen)) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        if high_noise_share > 0:
            high = torch.rand(batch, generator=gen) < high_noise_share
            t = torch.where(high, torch.randint(high_noise_from, 1000, (batch,), generator=gen), t)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        noisy = a * latents + s * noise
        target = a * noise - s * latents if prediction_type == "v_prediction" else noise
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cond = text_encoder(ids).last_hidden_state
            pred = unet(noisy, t, cond).sample
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k in live:
                for pe, pl in zip(ema[k].parameters(), live[k].parameters()):
                    pe.lerp_(pl, 1 - decay)
        if (step + 1) % 100 == 0:
            _log(out, stage="base", step=step + 1, loss=round(loss.item(), 4),
                 lr=round(opt.param_groups[0]["lr"], 6), sec_per_step=round((time.perf_counter() - t0) / 100, 3))
            t0 = time.perf_counter()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            modules = {**live, **{"ema_" + k: m for k, m in ema.items()}}
            _save_state(ckpt, step + 1, modules, opt, {"generator": gen.get_state()})
            pipe = _pipeline(vae, ema["text_encoder"], tokenizer, ema["unet"], prediction_type, zero_terminal_snr)
            result = prompt_following(pipe, evaluator, n=256, seed=1234)
            _log(out, stage="base", step=step + 1, eval=result)
            t0 = time.perf_counter()
        if stop_after is not None and step + 1 >= stop_after:
            _log(out, stage="base", stopped_after=step + 1)
            return
    pipe = _pipeline(vae, ema["text_encoder"], tokenizer, ema["unet"], prediction_type, zero_terminal_snr)
    pipe.unet.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.save_pretrained(out / "pipeline")
    _log(out, stage="base", done=True, steps=steps)


def measure_shipped(out: Path, n: int = 512, seed: int = 4321) -> dict:
    """Prompt following of the saved pipeline as users load it (float16 UNet/VAE read back in float32):
    ``n`` full captions and ``n`` one-attribute prompts, written to ``prompt_following.json``."""
    from . import load_pipeline
    from .evaluate import GUIDANCE, STEPS, load_evaluator, prompt_following

    result = prompt_following(load_pipeline(out / "pipeline"), load_evaluator(out), n=n, seed=seed)
    result.update(seed=seed, steps=STEPS, guidance=GUIDANCE, measured_on="pipeline/ loaded with load_pipeline()")
    (out / "prompt_following.json").write_text(json.dumps(result, indent=2) + "\n")
    _log(out, stage="measure", **result)
    return result


def write_checksums(out: Path) -> Path:
    import hashlib

    lines = []
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name not in ("SHA256SUMS",) and path.suffix in (".safetensors", ".json", ".jsonl", ".txt"):
            lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(out)}")
    target = out / "SHA256SUMS"
    target.write_text("\n".join(lines) + "\n")
    return target


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluator-steps", type=int, default=2000)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--base-steps", type=int, default=16000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dataset-size", type=int, default=100_000, help="base-stage scenes, VAE-encoded once")
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--eval-every", type=int, default=2000)
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--zero-terminal-snr", action="store_true",
                        help="rescale the betas so t=999 is pure noise (needs --prediction-type v_prediction)")
    parser.add_argument("--high-noise-share", type=float, default=0.0,
                        help="share of each batch with t drawn from [--high-noise-from, 1000)")
    parser.add_argument("--high-noise-from", type=int, default=700)
    parser.add_argument("--init-from", default=None, help="warm start: a base checkpoint's EMA weights")
    parser.add_argument("--stop-after", type=int, default=None, help="end the base stage after N steps")
    parser.add_argument("--checkpoint-name", default="base_checkpoint.pt")
    parser.add_argument("--measure", action="store_true",
                        help="measure the saved pipeline's prompt following on 512 + 512 samples (prompt_following.json)")
    parser.add_argument("--force", action="append", default=[], choices=["evaluator", "vae", "base"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _log(out, stage="start", args=vars(args), torch=torch.__version__)
    if "evaluator" in args.force or not (out / "evaluator.safetensors").is_file():
        train_evaluator(out, args.evaluator_steps, args.seed)
    if "vae" in args.force or not (out / "pipeline" / "vae").is_dir():
        shutil.rmtree(out / "pipeline" / "vae", ignore_errors=True)
        train_vae(out, args.vae_steps, args.seed)
    if "base" in args.force or not (out / "pipeline" / "model_index.json").is_file():
        train_base(out, args.base_steps, args.seed, args.batch, args.eval_every, args.lr, args.dataset_size,
                   args.prediction_type, Path(args.init_from) if args.init_from else None, args.stop_after,
                   args.checkpoint_name, args.zero_terminal_snr, args.high_noise_share, args.high_noise_from)
        if args.stop_after is not None and not (out / "pipeline" / "model_index.json").is_file():
            return 0
    if args.measure:
        measure_shipped(out)
    write_checksums(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
