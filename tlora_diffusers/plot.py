"""Pictures of a T-LoRA: rank-vs-timestep curves (matplotlib) and labelled image grids (Pillow).

matplotlib is optional for the library and imported only when a curve is drawn; figures
are built with ``matplotlib.figure.Figure``, not ``pyplot``, so no global state or GUI
backend is touched (safe in servers and threads).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from .config import TLoRAConfig
from .schedule import active_rank

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = ["rank_schedule_figure", "save_figure", "figure_to_image", "image_grid", "labelled_grid"]


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
        ax.plot([], [], "o", ms=4, color="0.4", label=sampling_label)
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
    """Write a figure; the format comes from the suffix (.png, .svg, .pdf), ``.png`` is added when there is none.

    Returns the path actually written.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    fig.savefig(path)
    return path


def figure_to_image(fig: "Figure") -> "Image.Image":
    """A figure as an RGB PIL image (PNG round trip, no GUI backend)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (a word longer than that gets a line of its own)."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def image_grid(
    images: Sequence["Image.Image"],
    labels: Optional[Sequence[str]] = None,
    *,
    cols: Optional[int] = None,
    pad: int = 4,
    min_cell: int = 128,
) -> "Image.Image":
    """Images in a grid, row-major, each with its label (wrapped to the cell) in a strip above it.

    Cells are the size of the largest image, upscaled (nearest neighbour, whole factors) to at
    least ``min_cell`` pixels wide so that labels fit and small images stay visible.

    Example:
        >>> grid = image_grid(masked + unmasked, ["masked"] * 2 + ["unmasked"] * 2, cols=2)
    """
    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"image_grid got {len(images)} images but {len(labels)} labels")
    cols = cols or len(images)
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    rows = [images[i:i + cols] for i in range(0, len(images), cols)]
    cell_labels = None if labels is None else [list(labels[i:i + cols]) for i in range(0, len(images), cols)]
    return labelled_grid(rows, cell_labels=cell_labels, pad=pad, min_cell=min_cell)


def labelled_grid(
    rows: Sequence[Sequence["Image.Image"]],
    *,
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    cell_labels: Optional[Sequence[Sequence[str]]] = None,
    pad: int = 6,
    min_cell: int = 128,
    title: Optional[str] = None,
) -> "Image.Image":
    """A table of images: optional column headers (e.g. prompts), row labels (e.g. methods) on the left
    and a label above each cell; all text wrapped to fit, never cut."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [list(r) for r in rows]
    cols = max(len(r) for r in rows)
    natural = max(im.width for r in rows for im in r)
    factor = max(1, -(-min_cell // natural))
    cell_w = natural * factor
    cell_h = max(im.height for r in rows for im in r) * factor
    size = max(11, min(18, cell_w // 10))
    font = ImageFont.load_default(size=size)
    line_h = int(size * 1.3)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def height(texts: Sequence[str], width: int) -> int:
        return max((len(_wrap(scratch, t, font, width)) for t in texts), default=0) * line_h

    label_w = 0 if not row_labels else min(2 * cell_w, max(int(scratch.textlength(w, font=font))
                                                            for t in row_labels for w in str(t).split()) + 2 * pad)
    label_w = max(label_w, cell_w) if row_labels else 0
    title_h = height([title], cols * (cell_w + pad) + label_w) + pad if title else 0
    header_h = height(col_labels, cell_w) + pad if col_labels else 0
    strip_h = [height(c, cell_w) + (pad if any(c) else 0) for c in cell_labels] if cell_labels else [0] * len(rows)
    width = label_w + cols * (cell_w + pad) + pad
    total_h = title_h + header_h + sum(cell_h + s + pad for s in strip_h) + pad
    grid = Image.new("RGB", (width, total_h), "white")
    draw = ImageDraw.Draw(grid)

    def text(x: int, y: int, value: str, w: int) -> None:
        for i, line in enumerate(_wrap(draw, value, font, w)):
            draw.text((x, y + i * line_h), line, fill="black", font=font)

    y = pad
    if title:
        text(pad, y, title, width - 2 * pad)
        y += title_h
    if col_labels:
        for j, label in enumerate(col_labels):
            text(label_w + pad + j * (cell_w + pad), y, label, cell_w)
        y += header_h
    for i, row in enumerate(rows):
        if row_labels:
            text(pad, y + strip_h[i] + cell_h // 3, row_labels[i], label_w - 2 * pad)
        for j, im in enumerate(row):
            x = label_w + pad + j * (cell_w + pad)
            if cell_labels and j < len(cell_labels[i]):
                text(x, y, cell_labels[i][j], cell_w)
            big = im.convert("RGB").resize((im.width * factor, im.height * factor), Image.NEAREST)
            grid.paste(big, (x + (cell_w - big.width) // 2, y + strip_h[i] + (cell_h - big.height) // 2))
        y += cell_h + strip_h[i] + pad
    return grid
