"""Instance images: read, validate and prepare once, before any training step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union

import torch

__all__ = ["IMAGE_SUFFIXES", "find_images", "load_images", "file_digest"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def find_images(images: Union[str, Path, Sequence[Union[str, Path]]]) -> list[Path]:
    """Image files from a folder or a list of files; a clear error when there are none."""
    if isinstance(images, (str, Path)):
        root = Path(images)
        if root.is_dir():
            files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            return files
        images = [root]
    files = [Path(p) for p in images]
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: instance image not found")
    if not files:
        raise ValueError("no instance images given")
    return files


def file_digest(path: Union[str, Path]) -> str:
    """``name:sha256`` of a file: a resumed run must train on the same images, not just the same paths."""
    import hashlib

    path = Path(path)
    return f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def load_images(files: Sequence[Path], resolution: int) -> torch.Tensor:
    """``(N, 3, res, res)`` in [-1, 1]: resized on the short side and centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    if resolution < 16 or resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16 and >= 16, got {resolution}")
    out = []
    for path in files:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: cannot read this image ({e})") from None
        scale = resolution / min(img.size)
        img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                         Image.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
        out.append(t.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


def image_sizes(files: Sequence[Path]) -> list[tuple[int, int]]:
    """``(width, height)`` of each image, read from its header."""
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for path in files:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: cannot read this image ({e})") from None
    return sizes


def model_resolution(pipe: Any) -> int:
    """The image side the pipeline generates by default: its ``default_sample_size`` (or the UNet's
    ``sample_size``) times the VAE's scale factor (the shipped scenes model: 16 x 2 = 32; SDXL: 128 x 8)."""
    factor = getattr(pipe, "vae_scale_factor", None) or 8
    size = getattr(pipe, "default_sample_size", None)
    if size is None:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{type(pipe).__name__} does not say its resolution; pass resolution= (--resolution PX)")
    return size * int(factor)
