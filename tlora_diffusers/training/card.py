"""The model card a training run writes (``README.md``, as diffusers' DreamBooth LoRA scripts do) and the upload."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["write_model_card", "push_to_hub", "check_hub_access", "TAGS"]

TAGS = ("lora", "t-lora", "diffusers", "text-to-image", "template:sd-lora")

_BODY = """# {kind}: {prompt}

{what} for `{pipeline}` (`{denoiser}`), trained with `tlora_diffusers` on {num_images} image(s).

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

{how}

```python
import torch
from diffusers import DiffusionPipeline
{imports}
pipe = DiffusionPipeline.from_pretrained("{base_model}", dtype=torch.bfloat16)
pipe.load_lora_weights("{repo_or_folder}")
{call}
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
    hub_base = _hub_id(cfg.model)
    plain = cfg.min_rank == cfg.rank  # every rank at every step: an ordinary LoRA (the experiment's baseline)
    tags = [t for t in TAGS if not (plain and t == "t-lora")]
    data = ModelCardData(base_model=hub_base, library_name="diffusers", license="other", tags=tags,
                         instance_prompt=cfg.prompt, widget=widgets or None)
    body = _BODY.format(
        kind="LoRA" if plain else "T-LoRA", what=_PLAIN if plain else _TLORA, how=_HOW_PLAIN if plain else _HOW_TLORA,
        imports="" if plain else "from tlora_diffusers import TLoRAPatch\n",
        call=(f'image = pipe("{cfg.prompt}").images[0]' if plain
              else f'with TLoRAPatch(pipe):\n    image = pipe("{cfg.prompt}").images[0]'),
        prompt=cfg.prompt, pipeline=pipeline, denoiser=denoiser, num_images=_count(cfg.images),
        base_model=hub_base or Path(str(cfg.model)).name, variant=cfg.variant, rank=cfg.rank, min_rank=cfg.min_rank,
        alpha=cfg.alpha,
        steps=cfg.steps, learning_rate=cfg.learning_rate, repo_or_folder=cfg.hub_model_id or str(out),
        validation=validation_text,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = out / "README.md"
    tmp = out / ".README.md.tmp"
    tmp.write_text(str(card).replace("\n\n\n", "\n\n"), encoding="utf-8")
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


def _hub_id(model: Any) -> "str | None":
    """``model`` when it is a Hub repo id (``user/repo``, not a local folder), else ``None`` (Hub metadata
    takes repo ids only; a local path would be invalid there)."""
    import re

    text = str(model)
    if Path(text).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        return None
    return text


def check_hub_access(repo_id: str) -> str:
    """Before training: the Hub is reachable and a token is set, else one line that says what to do."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        if constants.HF_HUB_OFFLINE:
            raise OfflineModeIsEnabled("HF_HUB_OFFLINE")
        user = HfApi().whoami()
    except OfflineModeIsEnabled:
        raise OSError(f"--push-to-hub to {repo_id}: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE is "
                      "set); nothing was trained. Train without --push-to-hub and upload the folder later with "
                      f"`hf upload {repo_id} OUT`") from None
    except Exception as e:  # no token (LocalTokenNotFoundError / 401), or no network
        reason = "not logged in (run `hf auth login`)" if "token" in str(e).lower() or "401" in str(e) else (
            f"cannot reach the Hub ({type(e).__name__})")
        raise OSError(f"--push-to-hub to {repo_id}: {reason}; nothing was trained") from None
    return user.get("name", "") if isinstance(user, dict) else ""


_TLORA = ("A [T-LoRA](https://arxiv.org/abs/2507.05964) (a LoRA whose active rank follows the diffusion timestep: "
          "few ranks at high noise, all ranks near t = 0)")
_PLAIN = ("An ordinary LoRA (min_rank = max_rank: every rank at every step), trained as the baseline of a "
          "[T-LoRA](https://arxiv.org/abs/2507.05964) comparison")
_HOW_TLORA = ("A T-LoRA is trained with its rank mask at every denoiser call and is meant to run with it. A loader that "
              "ignores the schedule runs every rank at every step, which is not what was trained (in tlora_diffusers' "
              "measured experiment that weakened the concept of rank-4 T-LoRAs with min_rank 1 and broke rank-4 ortho "
              "ones). The schedule is stored in the file, so two lines on the stock pipeline suffice:")
_HOW_PLAIN = "Every rank is active at every step, so it needs no mask; stock diffusers loads it like any LoRA:"
