"""Training data for ``fastdiff train``: the whole dataset held in memory as uint8.

Every source (the embedded ``shapes`` set, a folder of images, a ``.npz`` or
``.pt``/``.pth`` file) ends up as one contiguous uint8 tensor of shape
(N, C, S, S) with C = 3 (RGB) or 1 (luma). It is loaded once; batches are
converted to the model's [-1, 1] range with :func:`to_model_range`.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataError",
    "EMBEDDED",
    "IMAGE_EXTENSIONS",
    "make_shapes",
    "load_images",
    "to_model_range",
    "from_model_range",
]


class DataError(ValueError):
    """A user error in the data (missing folder, unreadable image, bad array): the CLI prints the message and exits 2."""


EMBEDDED = "shapes"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_ARRAY_EXTENSIONS = (".npz", ".pt", ".pth")

# ITU-R BT.601 luma weights, the ones Pillow's RGB -> L conversion uses, so a
# folder loaded with channels=1 and an array converted here agree.
_LUMA = (0.299, 0.587, 0.114)

# Dark background colours and bright saturated disc colours (RGB, 0..255).
# Few and far apart: a tiny U-Net trained for minutes can learn the set.
_BACKGROUNDS = torch.tensor(
    [
        [20, 24, 48],  # navy
        [40, 16, 52],  # plum
        [12, 44, 40],  # deep teal
        [48, 28, 16],  # brown
        [28, 28, 28],  # charcoal
        [10, 36, 14],  # forest
    ],
    dtype=torch.float32,
)
_DISCS = torch.tensor(
    [
        [240, 60, 50],  # red
        [250, 200, 40],  # yellow
        [60, 200, 90],  # green
        [60, 150, 250],  # blue
        [245, 245, 240],  # white
        [240, 110, 220],  # pink
    ],
    dtype=torch.float32,
)

# Images rendered per step of make_shapes: bounds the float intermediates
# (about 4 * 5 * S * S bytes per image) without changing the output.
_RENDER_CHUNK = 512


def _check_positive_int(value, name: str) -> int:
    # bool is an int subclass; True is no image size.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def make_shapes(num_images: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """The embedded procedural dataset: (num_images, 3, S, S) uint8, deterministic in ``seed``.

    Each image is a smooth vertical gradient between two dark palette colours
    with one large anti-aliased disc in a bright palette colour on top (radius
    20-35% of the image size, centre kept so that the disc lies mostly inside).
    All random parameters come from one ``torch.Generator`` seeded with
    ``seed`` and are drawn before rendering, so the output is the same on every
    machine and does not depend on how rendering is chunked.
    """
    n = _check_positive_int(num_images, "num_images")
    size = _check_positive_int(image_size, "image_size")

    gen = torch.Generator().manual_seed(int(seed))
    top = torch.randint(len(_BACKGROUNDS), (n,), generator=gen)
    # Bottom colour differs from the top one so every image has a gradient.
    bottom = (top + torch.randint(1, len(_BACKGROUNDS), (n,), generator=gen)) % len(_BACKGROUNDS)
    disc = torch.randint(len(_DISCS), (n,), generator=gen)
    radius = (0.20 + 0.15 * torch.rand(n, generator=gen, dtype=torch.float64)) * size
    # Centre at least 0.7 radius from every edge: at most a thin sliver is cut off.
    margin = 0.7 * radius
    cx = margin + torch.rand(n, generator=gen, dtype=torch.float64) * (size - 2 * margin)
    cy = margin + torch.rand(n, generator=gen, dtype=torch.float64) * (size - 2 * margin)
    radius, cx, cy = radius.float(), cx.float(), cy.float()

    coords = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    ramp = (coords / size).view(1, 1, size, 1)  # 0 at the top, 1 at the bottom
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for start in range(0, n, _RENDER_CHUNK):
        sl = slice(start, min(start + _RENDER_CHUNK, n))
        c_top = _BACKGROUNDS[top[sl]].view(-1, 3, 1, 1)
        c_bottom = _BACKGROUNDS[bottom[sl]].view(-1, 3, 1, 1)
        background = c_top + (c_bottom - c_top) * ramp  # (n, 3, S, 1), broadcast over x
        dy = coords.view(1, size, 1) - cy[sl].view(-1, 1, 1)
        dx = coords.view(1, 1, size) - cx[sl].view(-1, 1, 1)
        distance = torch.sqrt(dx * dx + dy * dy)
        # Analytic coverage of a pixel by the disc edge: a one-pixel linear ramp.
        alpha = (radius[sl].view(-1, 1, 1) + 0.5 - distance).clamp_(0.0, 1.0).unsqueeze(1)
        colour = _DISCS[disc[sl]].view(-1, 3, 1, 1)
        image = background + (colour - background) * alpha
        out[sl] = image.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 1, H, W) uint8, rounded like Pillow's convert("L")."""
    weights = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    gray = (images.float() * weights).sum(dim=1, keepdim=True)
    return gray.round_().clamp_(0, 255).to(torch.uint8)


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    have = images.shape[1]
    if have == channels:
        return images
    if channels == 1:
        return _luma(images)
    return images.expand(-1, 3, -1, -1)


def _load_folder(folder: Path, image_size: int, channels: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise DataError(
            f"data folder {str(folder)!r} holds no image files "
            f"(looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    mode = "RGB" if channels == 3 else "L"
    out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img = img.convert(mode)  # also decodes: a corrupt file fails here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image file {str(path)!r}: {exc}") from exc
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        # resize with a box crops and resamples in one antialiased step.
        img = img.resize(
            (image_size, image_size),
            Image.Resampling.LANCZOS,
            box=(left, top, left + side, top + side),
        )
        out[i] = np.asarray(img).reshape(image_size, image_size, channels)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _read_npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if "images" in archive.files:
                return archive["images"]
            if len(names) == 1:
                return archive[names[0]]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read .npz file {str(path)!r}: {exc}") from exc
    if not names:
        raise DataError(f".npz file {str(path)!r} holds no arrays")
    raise DataError(
        f".npz file {str(path)!r} has no array named 'images' and holds several arrays "
        f"({', '.join(names)}): name the image array 'images'"
    )


def _read_torch(path: Path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many kinds (pickle, zip, unpickler)
        raise DataError(f"cannot read {path.suffix} file {str(path)!r}: {exc}") from exc
    if isinstance(obj, dict):
        if "images" not in obj:
            keys = ", ".join(repr(k) for k in obj)
            raise DataError(f"{path.suffix} file {str(path)!r} holds a dict without key 'images' (keys: {keys})")
        obj = obj["images"]
    if not isinstance(obj, torch.Tensor):
        raise DataError(
            f"{path.suffix} file {str(path)!r} must hold a tensor or a dict with key 'images', "
            f"got {type(obj).__name__}"
        )
    return obj


def _array_to_images(array, source: str, image_size: int, channels: int) -> torch.Tensor:
    """An (N, H, W), (N, H, W, C) or (N, C, H, W) array -> (N, channels, S, S) uint8.

    Value range by dtype: uint8 (or another integer type) is 0..255; a float
    array with min < 0 is taken as [-1, 1], otherwise as [0, 1].
    """
    if isinstance(array, np.ndarray):
        if array.dtype.kind not in "uif":
            raise DataError(
                f"images in {source} have dtype {array.dtype}: expected uint8 (0..255) or float ([0, 1] or [-1, 1])"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    else:
        tensor = array.detach().cpu()
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise DataError(
            f"images in {source} have dtype {tensor.dtype}: expected uint8 (0..255) or float ([0, 1] or [-1, 1])"
        )

    shape = tuple(tensor.shape)
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)  # (N, H, W) grayscale
    elif tensor.dim() == 4:
        nchw = shape[1] in (1, 3)
        nhwc = shape[3] in (1, 3)
        if not (nchw or nhwc):
            raise DataError(
                f"images in {source} have shape {shape}: expected 1 or 3 channels on axis 1 "
                f"(N, C, H, W) or axis 3 (N, H, W, C)"
            )
        if nchw and nhwc:
            # Both ends could be channels only for tiny images: the spatial size decides.
            nchw = shape[2:] == (image_size, image_size) or shape[1:3] != (image_size, image_size)
        if not nchw:
            tensor = tensor.permute(0, 3, 1, 2)
    else:
        raise DataError(
            f"images in {source} have {tensor.dim()} dimensions (shape {shape}): expected "
            f"(N, H, W), (N, H, W, C) or (N, C, H, W)"
        )

    n, _, h, w = tensor.shape
    if n == 0:
        raise DataError(f"images in {source} form an empty dataset (shape {shape})")
    if (h, w) != (image_size, image_size):
        hint = f"pass image_size {h} or resize the data" if h == w else "arrays must hold square images"
        raise DataError(
            f"images in {source} are {h}x{w} but image_size is {image_size} "
            f"(arrays are never cropped or resized): {hint}"
        )

    if tensor.dtype == torch.uint8:
        images = tensor
    elif tensor.is_floating_point():
        values = tensor.float()
        if not torch.isfinite(values).all():
            raise DataError(f"images in {source} contain NaN or infinite values")
        lo, hi = values.min().item(), values.max().item()
        tol = 1e-3  # float round-off around the range ends
        if lo < -1 - tol or hi > 1 + tol:
            raise DataError(
                f"float images in {source} range over [{lo:g}, {hi:g}]: expected [0, 1] or [-1, 1] "
                f"(store 0..255 data as uint8)"
            )
        scaled = (values + 1) * 127.5 if lo < 0 else values * 255
        images = scaled.round_().clamp_(0, 255).to(torch.uint8)
    else:
        wide = tensor.to(torch.int64)  # min/max are not implemented for every integer dtype
        lo, hi = wide.min().item(), wide.max().item()
        if lo < 0 or hi > 255:
            raise DataError(
                f"integer images in {source} ({tensor.dtype}) range over [{lo}, {hi}]: expected 0..255"
            )
        images = wide.to(torch.uint8)
    return _to_channels(images, channels).contiguous()


def load_images(
    data: str | os.PathLike | None,
    image_size: int,
    channels: int = 3,
    *,
    num_images: int = 4096,
    seed: int = 0,
) -> torch.Tensor:
    """The training set as an (N, channels, image_size, image_size) uint8 tensor, contiguous.

    ``data`` is one of:

    * ``None`` or ``"shapes"``: the embedded :func:`make_shapes` set of
      ``num_images`` images drawn with ``seed`` (converted to one channel by
      luma when ``channels == 1``);
    * a directory: every image file under it, recursively, in sorted path
      order (extensions .png .jpg .jpeg .bmp .gif .webp, any case), converted
      to RGB or L, center-cropped to a square and resized to ``image_size``
      with antialiased Lanczos resampling;
    * a ``.npz`` file: the array named ``images``, or the only array it holds;
    * a ``.pt``/``.pth`` file: a tensor, or a dict with key ``images``.

    Arrays and tensors are (N, H, W, C) or (N, C, H, W) with C in (1, 3) (the
    layout is told by the axis that holds 1 or 3), or (N, H, W) grayscale.
    Values: uint8 0..255, or float, read as [-1, 1] when its minimum is below
    0 and as [0, 1] otherwise. H and W must equal ``image_size``: arrays are
    never resized. Channels are converted 1 <-> 3 as needed.

    Raises :class:`DataError` for anything wrong with the data or the arguments.
    """
    size = _check_positive_int(image_size, "image_size")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")

    if data is None or (isinstance(data, str) and data == EMBEDDED):
        count = _check_positive_int(num_images, "num_images")
        return _to_channels(make_shapes(count, size, seed), channels).contiguous()

    path = Path(data)
    if not path.exists():
        raise DataError(
            f"data path {str(path)!r} does not exist "
            f"(give a folder of images, a .npz/.pt/.pth file, or {EMBEDDED!r} for the built-in set)"
        )
    if path.is_dir():
        images = _load_folder(path, size, channels)
    else:
        suffix = path.suffix.lower()
        if suffix == ".npz":
            array = _read_npz(path)
        elif suffix in (".pt", ".pth"):
            array = _read_torch(path)
        else:
            raise DataError(
                f"data file {str(path)!r} has unsupported extension {path.suffix!r}: accepted are a folder "
                f"of images ({', '.join(IMAGE_EXTENSIONS)}), {', '.join(_ARRAY_EXTENSIONS)} files, "
                f"or {EMBEDDED!r}"
            )
        images = _array_to_images(array, repr(str(path)), size, channels)
    return images


def to_model_range(batch_uint8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 0..255 -> float in [-1, 1]: x / 127.5 - 1."""
    if batch_uint8.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects a uint8 tensor, got {batch_uint8.dtype}")
    return batch_uint8.to(dtype) / 127.5 - 1


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] (clamped) -> uint8 0..255, rounded to nearest."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)
