"""Image-set readers and the atomic .npz writer."""

import zipfile

import numpy as np
import pytest
from PIL import Image

from epsscale.data.images import load_images, load_npz, save_npz, validate_images


def grey(n=5, h=28, w=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 1), dtype=np.uint8)


def rgb(n=4, h=8, w=6, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def write_pngs(folder, images, fmt="png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(folder / f"{i:06d}.{fmt}")


def assert_one_line(excinfo, name):
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert name in msg


# ----------------------------------------------------------------------------------------------
# Formats.


@pytest.mark.parametrize("images", [grey(), rgb()])
def test_npz_round_trip(tmp_path, images):
    labels = np.arange(len(images))
    path = save_npz(tmp_path / "samples.npz", images, labels)
    np.testing.assert_array_equal(load_images(path), images)
    got, got_labels = load_npz(path, with_labels=True)
    np.testing.assert_array_equal(got_labels, labels)
    with np.load(path) as f:  # ADM's layout
        assert set(f.files) == {"arr_0", "arr_1"}
    save_npz(tmp_path / "nolabels.npz", images)
    assert load_npz(tmp_path / "nolabels.npz", with_labels=True)[1] is None


def test_save_npz_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "out" / "s.npz"
    save_npz(path, grey(3))
    save_npz(path, grey(2, seed=9))
    assert load_images(path).shape[0] == 2
    assert [p.name for p in path.parent.iterdir()] == ["s.npz"]


@pytest.mark.parametrize("images", [grey(), rgb()])
def test_folder_of_pngs(tmp_path, images):
    write_pngs(tmp_path / "imgs", images)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    np.testing.assert_array_equal(load_images(tmp_path / "imgs"), images)


def test_folder_recursive_and_jpg(tmp_path):
    images = rgb(3, 16, 16)
    write_pngs(tmp_path / "a" / "b", images, fmt="jpg")
    got = load_images(tmp_path / "a")
    assert got.shape == images.shape and got.dtype == np.uint8  # JPEG is lossy: shape only


def test_rgba_png_becomes_rgb(tmp_path):
    (tmp_path / "d").mkdir()
    Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8)).save(tmp_path / "d" / "x.png")
    assert load_images(tmp_path / "d").shape == (1, 4, 4, 3)


@pytest.mark.parametrize("images", [grey(), rgb()])
def test_zip_of_pngs(tmp_path, images):
    write_pngs(tmp_path / "src" / "00000", images)
    with zipfile.ZipFile(tmp_path / "ds.zip", "w") as zf:
        for p in sorted((tmp_path / "src").rglob("*.png")):
            zf.write(p, p.relative_to(tmp_path / "src").as_posix())
        zf.writestr("dataset.json", '{"labels": null}')
    np.testing.assert_array_equal(load_images(tmp_path / "ds.zip"), images)


# ----------------------------------------------------------------------------------------------
# Errors: one line, naming the file.


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="no such file") as e:
        load_images(tmp_path / "nope.npz")
    assert_one_line(e, "nope.npz")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg images") as e:
        load_images(tmp_path / "empty")
    assert_one_line(e, "empty")


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((2, 4, 4, 1), dtype=np.float32), "expected dtype uint8"),
        (np.zeros((2, 4, 4), dtype=np.uint8), r"expected shape \[N, H, W, C\]"),
        (np.zeros((2, 4, 4, 4), dtype=np.uint8), "1 or 3 channels"),
        (np.zeros((2, 3, 4, 4), dtype=np.uint8), "1 or 3 channels"),  # NCHW
        (np.zeros((0, 4, 4, 3), dtype=np.uint8), "no images"),
    ],
)
def test_npz_bad_arrays(tmp_path, array, match):
    np.savez(tmp_path / "bad.npz", arr_0=array)
    with pytest.raises(ValueError, match=match) as e:
        load_images(tmp_path / "bad.npz")
    assert_one_line(e, "bad.npz")
    with pytest.raises(ValueError, match=match):
        save_npz(tmp_path / "out.npz", array)
    assert not (tmp_path / "out.npz").exists()


def test_npz_without_arr_0(tmp_path):
    np.savez(tmp_path / "other.npz", images=grey())
    with pytest.raises(ValueError, match="no 'arr_0'") as e:
        load_images(tmp_path / "other.npz")
    assert_one_line(e, "other.npz")


def test_npz_bad_labels(tmp_path):
    np.savez(tmp_path / "l.npz", arr_0=grey(3), arr_1=np.arange(4))
    with pytest.raises(ValueError, match="one label per image"):
        load_images(tmp_path / "l.npz")
    with pytest.raises(ValueError, match="labels must have shape"):
        save_npz(tmp_path / "m.npz", grey(3), np.arange(4))


@pytest.mark.parametrize("content", [b"", b"garbage, not a zip", None])
def test_corrupt_npz(tmp_path, content):
    path = tmp_path / "c.npz"
    if content is None:  # a real file cut in half
        save_npz(path, grey(20))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    # A file that is not a zip archive is named as not an .npz at all (and never as "pickled data");
    # a damaged archive is an .npz that cannot be read.
    with pytest.raises(ValueError, match="not a readable npz" if content is None else "not an .npz file") as e:
        load_images(path)
    assert_one_line(e, "c.npz")
    assert "pickle" not in str(e.value)


def test_corrupt_zip(tmp_path):
    write_pngs(tmp_path / "src", grey(4))
    with zipfile.ZipFile(tmp_path / "ok.zip", "w") as zf:
        for p in sorted((tmp_path / "src").glob("*.png")):
            zf.write(p, p.name)
    data = (tmp_path / "ok.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable zip") as e:
        load_images(tmp_path / "cut.zip")
    assert_one_line(e, "cut.zip")


def test_zip_with_corrupt_png_or_no_images(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("00000/img0.png", b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="cannot decode image") as e:
        load_images(tmp_path / "bad.zip")
    assert_one_line(e, "bad.zip:00000/img0.png")
    with zipfile.ZipFile(tmp_path / "none.zip", "w") as zf:
        zf.writestr("dataset.json", "{}")
    with pytest.raises(ValueError, match="zip contains no"):
        load_images(tmp_path / "none.zip")


def test_folder_with_corrupt_or_mismatched_images(tmp_path):
    write_pngs(tmp_path / "f", grey(2))
    (tmp_path / "f" / "zz.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode image") as e:
        load_images(tmp_path / "f")
    assert_one_line(e, "zz.png")
    write_pngs(tmp_path / "g", grey(2))
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "g" / "small.png")
    with pytest.raises(ValueError, match="images differ in shape"):
        load_images(tmp_path / "g")


def test_unsupported_extension(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported format"):
        load_images(tmp_path / "x.tar")


def test_validate_images_rejects_non_arrays():
    with pytest.raises(ValueError, match="numpy array"):
        validate_images([[1, 2]])
