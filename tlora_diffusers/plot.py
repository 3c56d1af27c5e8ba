"""Pictures of a T-LoRA: rank-vs-timestep curves (matplotlib) and labelled image grids (Pillow).

matplotlib is optional for the library and imported only when a curve is drawn; figures
are built with ``matplotlib.figure.Figure``, not ``pyplot``, so no global state or GUI
backend is touched (safe in servers and threads).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from .config import TLoRAConfig
from .schedule import active_rank

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = ["rank_schedule_figure", "save_figure", "figure_to_image", "image_grid"]


def _figure_class() -> type:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib, which is not installed: pip install matplotlib") from None
    return Figure


def _labels(configs: Sequence[TLoRAConfig]) -> list[str]:
    if len({(c.max_rank, c.min_rank) for c in configs}) == 1:
        return [f"alpha={c.alpha:g}" for c in configs]
    return [f"max_rank={c.max_rank}, min_rank={c.min_rank}, alpha={c.alpha:g}" for c in configs]


def rank_schedule_figure(
    configs: Union[TLoRAConfig, Sequence[TLoRAConfig]],
    *,
    num_train_timesteps: int = 1000,
    sampling_timesteps: Optional[Sequence[float]] = None,
    sampling_label: str = "sampling steps",
    title: Optional[str] = None,
) -> "Figure":
    """Active rank against timestep (paper eq. 6), one curve per config, sampling steps as dots.

    ``sampling_timesteps`` are in scheduler units (what ``pipe.scheduler.timesteps`` holds);
    each is drawn on every curve at the rank that step runs with.

    Example:
        >>> fig = rank_schedule_figure([TLoRAConfig(64, alpha=a) for a in (0.5, 1, 2)],
        ...                            sampling_timesteps=[961, 721, 481, 241, 1])
        >>> save_figure(fig, "schedule.png")
    """
    configs = [configs] if isinstance(configs, TLoRAConfig) else list(configs)
    if not configs:
        raise ValueError("rank_schedule_figure needs at least one TLoRAConfig")
    T = num_train_timesteps
    fig = _figure_class()(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    t = torch.arange(T + 1)
    steps = None if sampling_timesteps is None else torch.as_tensor(list(sampling_timesteps), dtype=torch.float64)
    for cfg, label in zip(configs, _labels(configs)):
        (line,) = ax.plot(t.numpy(), active_rank(t, cfg, T).numpy(), drawstyle="steps-post", label=label)
        if steps is not None and steps.numel():
            ax.plot(steps.numpy(), active_rank(steps, cfg, T).numpy(), "o", ms=4, color=line.get_color())
    if steps is not None and steps.numel():
        ax.plot([], [], "o", ms=4, color="0.4", label=f"{sampling_label} ({steps.numel()})")
    ax.set_xlim(0, T)
    ax.set_ylim(0, max(c.max_rank for c in configs) * 1.05)
    ax.set_xlabel(f"timestep t (scheduler units; T = {T} is pure noise)")
    ax.set_ylabel("active rank")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    if title is None:
        title = "T-LoRA rank schedule"
        if len({(c.max_rank, c.min_rank) for c in configs}) == 1:
            title += f" (max_rank={configs[0].max_rank}, min_rank={configs[0].min_rank})"
    ax.set_title(title)
    return fig


def save_figure(fig: "Figure", path: Union[str, Path]) -> Path:
    """Write a figure (format from the suffix: .png, .svg, .pdf)."""
    path = Path(path)
    fig.savefig(path)
    return path


def figure_to_image(fig: "Figure") -> "Image.Image":
    """A figure as an RGB PIL image (PNG round trip, no GUI backend)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def image_grid(
    images: Sequence["Image.Image"],
    labels: Optional[Sequence[str]] = None,
    *,
    cols: Optional[int] = None,
    pad: int = 4,
) -> "Image.Image":
    """Images in a grid, row-major, each with its label in a strip above it.

    Cells are the size of the largest image; smaller ones are centred.

    Example:
        >>> grid = image_grid(masked + unmasked, ["masked"] * 2 + ["unmasked"] * 2, cols=2)
    """
    from PIL import Image, ImageDraw, ImageFont

    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"image_grid got {len(images)} images but {len(labels)} labels")
    cols = cols or len(images)
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    rows = -(-len(images) // cols)
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    size = max(10, min(24, width // 16))
    font = ImageFont.load_default(size=size)
    strip = 0 if labels is None else int(size * 1.5) + pad
    grid = Image.new("RGB", (cols * (width + pad) + pad, rows * (height + strip + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x = pad + (i % cols) * (width + pad)
        y = pad + (i // cols) * (height + strip + pad)
        if labels is not None:
            draw.text((x, y), str(labels[i]), fill="black", font=font)
        grid.paste(im.convert("RGB"), (x + (width - im.width) // 2, y + strip + (height - im.height) // 2))
    return grid
