"""Image output for ``fastdiff train``: sample grids written as PNG."""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .data import from_model_range

__all__ = ["save_grid"]


def save_grid(images: torch.Tensor, path, nrow: int | None = None, padding: int = 2) -> None:
    """Write a batch as one PNG grid.

    ``images`` is (B, C, H, W), float in [-1, 1] (clamped) or uint8, with C = 1
    (grayscale PNG) or 3 (RGB PNG). Images are laid out ``nrow`` to a row
    (default ``ceil(sqrt(B))``) with ``padding`` black pixels between them and
    around the border. The file is written to a temporary file in the same
    directory and moved into place, so a reader never sees a partial PNG; the
    parent directory is created when missing.
    """
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"save_grid: images must be a (B, C, H, W) tensor, got {shape}")
    b, c, h, w = images.shape
    if b == 0 or c not in (1, 3):
        raise ValueError(
            f"save_grid: images must hold at least one image with 1 or 3 channels, got shape {tuple(images.shape)}"
        )
    if nrow is None:
        nrow = math.ceil(math.sqrt(b))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow <= 0:
        raise ValueError(f"save_grid: nrow must be a positive integer, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"save_grid: padding must be a non-negative integer, got {padding!r}")

    pixels = images.detach().cpu()
    pixels = pixels if pixels.dtype == torch.uint8 else from_model_range(pixels)
    pixels = pixels.permute(0, 2, 3, 1).numpy()  # (B, H, W, C) for Pillow

    cols = min(nrow, b)
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(b):
        y = padding + (i // nrow) * (h + padding)
        x = padding + (i % nrow) * (w + padding)
        grid[y : y + h, x : x + w] = pixels[i]
    picture = Image.fromarray(grid[:, :, 0] if c == 1 else grid)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # The temp name does not end in .png, so the format is given.
            picture.save(f, format="PNG")
        # mkstemp makes the file private (0600); a picture gets the usual umask-based mode
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
