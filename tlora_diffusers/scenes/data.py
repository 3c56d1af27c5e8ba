"""The "scenes" world: procedurally generated 32×32 images described by words.

Each scene is one object (shape, colour, texture, size, position) on a flat background,
rendered deterministically (4× supersampled, then box-filtered, so edges are smooth) and
captioned with the same words. The base model of :mod:`tlora_diffusers.scenes` is
trained on the :data:`BASE_SHAPES`; the :data:`NOVEL_SHAPES` are held out, so a T-LoRA
can be taught a concept the base has never seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "RESOLUTION", "BASE_SHAPES", "NOVEL_SHAPES", "SHAPES", "COLOURS", "BACKGROUNDS", "POSITIONS", "SIZES",
    "TEXTURES", "ATTRIBUTES", "Scene", "sample_scene", "render", "caption", "scene_words",
]

RESOLUTION = 32
_SUPERSAMPLE = 4

BASE_SHAPES = ("circle", "square", "triangle", "diamond")
#: Shapes the base model never sees: concepts for single-image customisation.
NOVEL_SHAPES = ("ring", "cross", "star", "heart")
SHAPES = BASE_SHAPES + NOVEL_SHAPES
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "yellow": (235, 205, 30), "purple": (150, 55, 190),
}
BACKGROUNDS = {
    "white": (240, 240, 240), "black": (18, 18, 18), "gray": (125, 125, 125),
    "blue": (70, 110, 215), "green": (60, 150, 80),
}
#: Object centres in a 32×32 image.
POSITIONS = {
    "top left": (8, 8), "top right": (24, 8), "bottom left": (8, 24), "bottom right": (24, 24), "center": (16, 16),
}
#: Object half-widths in pixels.
SIZES = {"small": 4.0, "large": 7.0}
TEXTURES = ("plain", "striped")
#: Every attribute and its values, in caption order.
ATTRIBUTES = {
    "size": tuple(SIZES), "colour": tuple(COLOURS), "texture": TEXTURES, "shape": SHAPES,
    "position": tuple(POSITIONS), "background": tuple(BACKGROUNDS),
}


@dataclass(frozen=True)
class Scene:
    """One object on a background; ``jitter`` moves it by whole pixels (kept within its quadrant)."""

    shape: str
    colour: str
    texture: str
    size: str
    position: str
    background: str
    jitter: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for name, allowed in ATTRIBUTES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Scene.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} object on a {self.background} background is invisible")

    def labels(self) -> dict[str, int]:
        """Class index of each attribute (what the evaluator predicts)."""
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def sample_scene(rng: random.Random, shapes: Sequence[str] = BASE_SHAPES, **fixed: str) -> Scene:
    """A uniformly random scene over ``shapes``; ``fixed`` pins attributes (e.g. ``background="blue"``)."""
    values = {name: fixed.get(name) for name in ATTRIBUTES}
    values["shape"] = values["shape"] or rng.choice(tuple(shapes))
    for name in ("size", "texture", "position", "background", "colour"):
        if values[name] is None:
            choices = ATTRIBUTES[name]
            if name == "colour":
                choices = tuple(c for c in choices if c != values["background"])
            elif name == "background" and fixed.get("colour"):
                choices = tuple(b for b in choices if b != fixed["colour"])
            values[name] = rng.choice(choices)
    return Scene(**values, jitter=(rng.randint(-1, 1), rng.randint(-1, 1)))


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Inside-test of ``shape`` centred at 0 with half-width ``r`` (coordinates in pixels)."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (ax <= 0.85 * r) & (ay <= 0.85 * r)
    if shape == "triangle":  # pointing up
        return (y <= r * 0.8) & (y >= -r) & (ax <= (y + r) * 0.55)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "ring":
        d = x * x + y * y
        return (d <= r * r) & (d >= (0.55 * r) ** 2)
    if shape == "cross":
        w = 0.33 * r
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    if shape == "star":  # five points
        angle = np.arctan2(x, -y)
        radius = np.sqrt(x * x + y * y)
        k = np.cos(2.5 * angle) ** 2
        return radius <= r * (0.45 + 0.55 * k ** 2)
    if shape == "heart":
        u, v = x / r, -y / r + 0.15
        return (u * u + v * v - 0.7) ** 3 - u * u * v ** 3 * 1.2 <= 0
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """The scene as a ``(resolution, resolution, 3)`` uint8 array (deterministic)."""
    s = _SUPERSAMPLE
    scale = resolution / RESOLUTION
    n = resolution * s
    coords = (np.arange(n) + 0.5) / s
    cx, cy = POSITIONS[scene.position]
    cx, cy = (cx + scene.jitter[0]) * scale, (cy + scene.jitter[1]) * scale
    x, y = np.meshgrid(coords - cx, coords - cy)
    inside = _shape_mask(scene.shape, x, y, SIZES[scene.size] * scale)
    colour = np.array(COLOURS[scene.colour], dtype=np.float64)
    image = np.broadcast_to(np.array(BACKGROUNDS[scene.background], dtype=np.float64), (n, n, 3)).copy()
    fill = np.broadcast_to(colour, (n, n, 3)).copy()
    if scene.texture == "striped":  # 2-pixel horizontal stripes of a darker shade
        dark = (np.floor(coords / (2 * scale)) % 2 == 1)[:, None] & np.ones((1, n), dtype=bool)
        fill[dark] = colour * 0.4
    image[inside] = fill[inside]
    image = image.reshape(resolution, s, resolution, s, 3).mean(axis=(1, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def scene_words(scene: Scene, keep: Optional[Sequence[str]] = None, subject: Optional[str] = None) -> str:
    """The caption of ``scene`` with only the attributes in ``keep`` (default: all).

    ``subject`` replaces the size/colour/texture/shape words (e.g. ``"sks shape"``), as a
    DreamBooth identifier stands for the subject. Word order is fixed:
    ``a [size] [colour] [texture] <shape|shape> [at the <position>|in the center] [on a <bg> background]``.
    """
    keep = set(ATTRIBUTES if keep is None else keep)
    words = ["a"]
    if subject is not None:
        words.append(subject)
    else:
        words += [getattr(scene, a) for a in ("size", "colour") if a in keep]
        if "texture" in keep:
            words.append(scene.texture)
        words.append(scene.shape if "shape" in keep else "shape")
    if "position" in keep:
        words.append("in the center" if scene.position == "center" else f"at the {scene.position}")
    if "background" in keep:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


def caption(scene: Scene, rng: Optional[random.Random] = None, drop: float = 0.0) -> str:
    """A training caption: each attribute is left out with probability ``drop``."""
    keep = [a for a in ATTRIBUTES if rng is None or rng.random() >= drop]
    return scene_words(scene, keep)
