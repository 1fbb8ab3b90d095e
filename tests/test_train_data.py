"""fastdiff.train.data (datasets held as uint8) and fastdiff.train.images (PNG grids)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.train.data import (
    EMBEDDED,
    DataError,
    from_model_range,
    load_images,
    make_shapes,
    to_model_range,
)
from fastdiff.train import data as data_module
from fastdiff.train.images import save_grid


# --- the embedded dataset ---------------------------------------------------


def test_make_shapes_deterministic_in_seed():
    a = make_shapes(6, 16, seed=3)
    assert torch.equal(a, make_shapes(6, 16, seed=3))
    assert not torch.equal(a, make_shapes(6, 16, seed=4))


@pytest.mark.parametrize("size", [8, 64])
def test_make_shapes_shape_and_range(size):
    x = make_shapes(5, size)
    assert x.shape == (5, 3, size, size) and x.dtype == torch.uint8 and x.is_contiguous()
    # Dark backgrounds and bright discs: a wide range in every image.
    per_image = x.flatten(1)
    assert (per_image.max(dim=1).values.int() - per_image.min(dim=1).values.int()).min() > 100


def test_make_shapes_chunking_invisible(monkeypatch):
    # Parameters are drawn before rendering, so the chunk size cannot change the images.
    whole = make_shapes(7, 8, seed=2)
    monkeypatch.setattr(data_module, "_RENDER_CHUNK", 3)
    assert torch.equal(make_shapes(7, 8, seed=2), whole)


def test_load_images_embedded():
    x = load_images(None, 16, num_images=4, seed=1)
    assert torch.equal(x, make_shapes(4, 16, seed=1))
    assert torch.equal(load_images(EMBEDDED, 16, num_images=4, seed=1), x)
    gray = load_images(EMBEDDED, 16, channels=1, num_images=4, seed=1)
    assert gray.shape == (4, 1, 16, 16) and gray.dtype == torch.uint8


# --- image folders ----------------------------------------------------------


def _write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).convert(mode or "RGB").save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    # b.png: 20 wide, 12 high, red left/right 4 columns, green centre square.
    wide = np.zeros((12, 20, 3), np.uint8)
    wide[:, :4] = (255, 0, 0)
    wide[:, 16:] = (255, 0, 0)
    wide[:, 4:16] = (0, 255, 0)
    _write(root / "b.png", wide)
    _write(root / "a.JPG", np.full((10, 10, 3), (0, 0, 255)))
    _write(root / "sub" / "c.png", np.full((16, 8), 200), mode="L")  # tall grayscale
    (root / "notes.txt").write_text("not an image")
    return root


def test_load_folder_sorted_cropped_resized(folder):
    x = load_images(str(folder), 8)
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.uint8 and x.is_contiguous()
    # Sorted paths: a.JPG, b.png, sub/c.png.
    blue = x[0].float().mean(dim=(1, 2))
    assert blue[2] > 200 and blue[0] < 40
    # Center crop of b.png keeps only the green square.
    green = x[1].float().mean(dim=(1, 2))
    assert green[1] > 240 and green[0] < 10
    # Grayscale image converted to RGB: equal channels.
    assert torch.equal(x[2, 0], x[2, 1]) and torch.equal(x[2, 1], x[2, 2])
    assert abs(x[2].float().mean().item() - 200) < 2


def test_load_folder_one_channel(folder):
    x = load_images(folder, 8, channels=1)
    assert x.shape == (3, 1, 8, 8)
    assert abs(x[2].float().mean().item() - 200) < 2


# --- arrays -----------------------------------------------------------------


def test_npz_nhwc_uint8(tmp_path):
    arr = np.random.RandomState(0).randint(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=arr, labels=np.arange(4))
    x = load_images(str(tmp_path / "d.npz"), 8)
    assert torch.equal(x, torch.from_numpy(arr).permute(0, 3, 1, 2))
    assert x.is_contiguous()


def test_npz_nchw_float01_single_unnamed(tmp_path):
    ref = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    np.savez(tmp_path / "d.npz", ref.numpy().astype(np.float32) / 255)
    assert torch.equal(load_images(tmp_path / "d.npz", 8), ref)


def test_npz_float_minus_one_to_one_and_grayscale(tmp_path):
    ref = torch.randint(0, 256, (2, 8, 8), dtype=torch.uint8)
    ref[0, 0, 0] = 0  # the minimum below 0 marks the [-1, 1] range
    np.savez(tmp_path / "d.npz", images=to_model_range(ref).numpy())
    x = load_images(tmp_path / "d.npz", 8)
    assert x.shape == (2, 3, 8, 8)
    assert torch.equal(x[:, 0], ref) and torch.equal(x[:, 2], ref)


def test_pt_tensor_and_dict(tmp_path):
    ref = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    torch.save(ref, tmp_path / "t.pt")
    torch.save({"images": ref.permute(0, 2, 3, 1).contiguous()}, tmp_path / "d.pth")
    assert torch.equal(load_images(tmp_path / "t.pt", 8), ref)
    assert torch.equal(load_images(tmp_path / "d.pth", 8), ref)
    gray = load_images(tmp_path / "t.pt", 8, channels=1)
    luma = 0.299 * ref[:, 0] + 0.587 * ref[:, 1] + 0.114 * ref[:, 2]
    assert gray.shape == (2, 1, 8, 8)
    assert (gray[:, 0].float() - luma).abs().max() <= 0.5 + 1e-4


# --- errors -----------------------------------------------------------------


def test_error_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "nope", 8)


def test_error_empty_folder(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="no image files"):
        load_images(tmp_path, 8)


def test_error_corrupt_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read image file.*bad.png"):
        load_images(tmp_path, 8)


def test_error_npz_several_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((1, 8, 8)), y=np.zeros((1, 8, 8)))
    with pytest.raises(DataError, match="no array named 'images'.*x, y"):
        load_images(tmp_path / "d.npz", 8)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((2, 8), np.uint8), "2 dimensions"),
        (np.zeros((2, 8, 8, 4), np.uint8), "1 or 3 channels"),
        (np.zeros((2, 8, 8), bool), "dtype bool"),
        (np.zeros((2, 8, 8), np.complex64), "dtype complex64"),
        (np.zeros((2, 3, 16, 16), np.uint8), "16x16 but image_size is 8"),
        (np.zeros((0, 3, 8, 8), np.uint8), "empty dataset"),
        (np.full((1, 8, 8), 255.0, np.float32), r"range over \[255, 255\]"),
        (np.full((1, 8, 8), 300, np.int32), r"range over \[300, 300\]"),
    ],
)
def test_error_bad_arrays(tmp_path, array, match):
    np.savez(tmp_path / "d.npz", images=array)
    with pytest.raises(DataError, match=match):
        load_images(tmp_path / "d.npz", 8)


def test_error_pt_dict_without_images(tmp_path):
    torch.save({"x": torch.zeros(1, 3, 8, 8)}, tmp_path / "d.pt")
    with pytest.raises(DataError, match="without key 'images'"):
        load_images(tmp_path / "d.pt", 8)


def test_error_other_extension(tmp_path):
    (tmp_path / "d.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"unsupported extension '\.png'.*\.npz"):
        load_images(tmp_path / "d.png", 8)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "8"])
def test_error_bad_image_size(size):
    with pytest.raises(DataError, match="image_size must be a positive integer"):
        load_images(None, size)


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_error_bad_channels(channels):
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        load_images(None, 8, channels)


def test_error_empty_embedded():
    with pytest.raises(DataError, match="num_images must be a positive integer"):
        load_images(None, 8, num_images=0)


# --- ranges and grids ------------------------------------------------------


def test_model_range_round_trip_exact():
    x = torch.arange(256, dtype=torch.uint8)
    y = to_model_range(x)
    assert y.dtype == torch.float32 and y.min() == -1 and y.max() == 1
    assert torch.equal(from_model_range(y), x)
    assert torch.equal(from_model_range(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
@pytest.mark.parametrize("nrow, size", [(None, (3 * 10 + 2, 2 * 10 + 2)), (5, (5 * 10 + 2, 10 + 2)), (2, (22, 32))])
def test_save_grid(tmp_path, channels, mode, nrow, size):
    images = torch.rand(5, channels, 8, 8) * 2 - 1
    path = tmp_path / "out" / "grid.png"
    save_grid(images, path, nrow=nrow)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == mode and img.size == size
        pixels = np.asarray(img)
    # The first image sits after the 2-pixel border.
    first = from_model_range(images[0]).permute(1, 2, 0).numpy()
    assert np.array_equal(pixels[2:10, 2:10].reshape(8, 8, channels), first)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]


def test_save_grid_uint8_overwrites(tmp_path):
    path = tmp_path / "g.png"
    save_grid(torch.zeros(1, 3, 4, 4), path)
    save_grid(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), path, padding=0)
    with Image.open(path) as img:
        assert img.size == (8, 4) and np.asarray(img).min() == 255
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]
