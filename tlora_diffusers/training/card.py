"""The model card a training run writes (``README.md``, as diffusers' DreamBooth LoRA scripts do) and the upload."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["write_model_card", "push_to_hub", "TAGS"]

TAGS = ("lora", "t-lora", "diffusers", "text-to-image", "template:sd-lora")

_BODY = """# T-LoRA: {prompt}

A [T-LoRA](https://arxiv.org/abs/2507.05964) (timestep-dependent LoRA rank masking) for `{pipeline}`
(`{denoiser}`), trained with [tlora_diffusers](https://github.com/) on {num_images} image(s).

| | |
|---|---|
| base model | `{base_model}` |
| instance prompt | `{prompt}` |
| variant | {variant} |
| max_rank | {rank} |
| min_rank | {min_rank} |
| alpha (schedule exponent) | {alpha} |
| steps | {steps} |
| learning rate | {learning_rate} |

## How to use

A T-LoRA must run with its rank mask at every denoiser call; without it images come out
over-saturated. The schedule is stored in the file, so two lines on the stock pipeline suffice:

```python
import torch
from diffusers import DiffusionPipeline
from tlora_diffusers import TLoRAPatch

pipe = DiffusionPipeline.from_pretrained("{base_model}", dtype=torch.bfloat16)
pipe.load_lora_weights("{repo_or_folder}")
with TLoRAPatch(pipe):
    image = pipe("{prompt}").images[0]
```
{validation}"""


def write_model_card(out: Path, cfg: Any, pipeline: str, denoiser: str, validation: Sequence[Path]) -> Path:
    """Write ``out/README.md`` with huggingface_hub's ``ModelCard`` (atomically)."""
    from huggingface_hub import ModelCard, ModelCardData

    images = list(validation)[-len(cfg.validation_prompts):] if cfg.validation_prompts else []
    widgets = [{"text": p, "output": {"url": str(Path(i).relative_to(out))}}
               for p, i in zip(cfg.validation_prompts, images)]
    validation_text = ""
    if images:
        validation_text = "\n## Validation images\n\n" + "\n".join(
            f"![{p}]({Path(i).relative_to(out)})" for p, i in zip(cfg.validation_prompts, images)) + "\n"
    data = ModelCardData(base_model=str(cfg.model), library_name="diffusers", license="other", tags=list(TAGS),
                         instance_prompt=cfg.prompt, widget=widgets or None)
    body = _BODY.format(
        prompt=cfg.prompt, pipeline=pipeline, denoiser=denoiser, num_images=_count(cfg.images),
        base_model=cfg.model, variant=cfg.variant, rank=cfg.rank, min_rank=cfg.min_rank, alpha=cfg.alpha,
        steps=cfg.steps, learning_rate=cfg.learning_rate, repo_or_folder=cfg.hub_model_id or str(out),
        validation=validation_text,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = out / "README.md"
    tmp = out / ".README.md.tmp"
    tmp.write_text(str(card), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _count(images: Any) -> int:
    from .data import find_images

    return len(find_images(images))


def push_to_hub(out: Path, repo_id: str) -> str:
    """Create ``repo_id`` (if needed) and upload the run folder: the LoRA, its model card and validation images."""
    from huggingface_hub import create_repo, upload_folder

    repo = create_repo(repo_id, exist_ok=True).repo_id
    upload_folder(repo_id=repo, folder_path=str(out), commit_message="T-LoRA trained with tlora_diffusers",
                  ignore_patterns=["checkpoint-*", ".checkpoint-*", "*.tmp", "tensorboard/*", "logs.jsonl"])
    return repo
