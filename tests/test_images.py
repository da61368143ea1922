import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from fkdstore.errors import FkdstoreError, ValidationError
from fkdstore.images import ImageList, ImageReadError, image_size, list_images, load_image


def write_image(path, h=8, w=12, mode="RGB", fmt=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    write_image(root / "dog" / "b.png")
    write_image(root / "dog" / "a.PNG")
    write_image(root / "cat" / "z.jpg", fmt="JPEG")
    write_image(root / "cat" / "deep" / "x.png")
    write_image(root / "bird" / "c.webp", fmt="WEBP")
    write_image(root / "loose.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    return root


def test_list_folder_with_classes(tree):
    il = list_images(tree)
    assert isinstance(il, ImageList)
    assert il.root == str(tree.resolve())
    assert il.keys == ["bird/c.webp", "cat/deep/x.png", "cat/z.jpg", "dog/a.PNG", "dog/b.png", "loose.png"]
    assert il.classes == ["bird", "cat", "dog"]
    assert il.labels == [0, 1, 1, 2, 2, -1]
    assert len(il) == 6
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in il.paths)
    assert il.paths[1] == str(tree.resolve() / "cat" / "deep" / "x.png")
    assert list_images(str(tree)) == il  # str and Path give the same list


def test_list_flat_folder_has_no_labels(tmp_path):
    for name in ["b.png", "a.png", "c.bmp"]:
        write_image(tmp_path / name)
    il = list_images(tmp_path)
    assert il.keys == ["a.png", "b.png", "c.bmp"]
    assert il.labels == [-1, -1, -1] and il.classes == []


def test_list_file_list_keeps_given_paths(tree, monkeypatch):
    monkeypatch.chdir(tree)
    files = ["dog/b.png", str(tree / "cat" / "z.jpg"), "loose.png"]
    il = list_images(files)
    assert il.root is None
    assert il.keys == files
    assert il.paths == [str(tree / "dog" / "b.png"), str(tree / "cat" / "z.jpg"), str(tree / "loose.png")]
    assert il.labels == [-1, -1, -1] and il.classes == []
    with pytest.raises(ValidationError, match="repeat"):
        list_images(["loose.png", "loose.png"])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        list_images(["loose.png", "missing.png"])
    with pytest.raises(ValidationError, match="no images found"):
        list_images([])


def test_list_errors(tmp_path):
    with pytest.raises(ValidationError, match=f"no images found under {tmp_path}"):
        list_images(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValidationError, match="no images found"):
        list_images(tmp_path)
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(missing)
    f = write_image(tmp_path / "one.png")
    with pytest.raises(ValidationError, match="folder or a list"):
        list_images(f)


def test_load_image_converts_to_rgb(tmp_path):
    grey = write_image(tmp_path / "g.png", h=5, w=7, mode="L")
    img = load_image(grey)
    assert img.mode == "RGB" and img.size == (7, 5)
    rgba = write_image(tmp_path / "a.png", mode="RGBA")
    assert load_image(str(rgba)).mode == "RGB"
    rgb = write_image(tmp_path / "c.png", seed=3)
    assert np.array_equal(np.asarray(load_image(rgb)), np.asarray(Image.open(rgb)))


def test_truncated_jpeg_raises_image_read_error(tmp_path):
    path = write_image(tmp_path / "t.jpg", h=256, w=256, fmt="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="t.jpg") as info:
        load_image(path)
    assert isinstance(info.value, FkdstoreError)
    assert "truncated" in str(info.value)
    # The header is intact: the size is still readable without decoding the pixels.
    assert image_size(path) == (256, 256)


def test_unreadable_and_missing(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match="bad.png"):
        load_image(bad)
    with pytest.raises(ImageReadError, match="bad.png"):
        image_size(bad)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_image_size_does_not_decode(tmp_path, monkeypatch):
    path = write_image(tmp_path / "s.png", h=31, w=17)

    def boom(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", boom)
    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    assert image_size(path) == (31, 17)
    assert image_size(str(path)) == (31, 17)


def test_symlink_loop_is_refused_not_followed_forever(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")  # a/loop -> a
    with pytest.raises(ValidationError, match="symlink loop"):
        list_images(tmp_path)


def test_non_utf8_file_name_is_refused_naming_its_bytes(tmp_path):
    (tmp_path / "c").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "c" / "ok.png")
    bad = os.path.join(os.fsencode(tmp_path / "c"), b"caf\xe9.png")  # Latin-1, not UTF-8
    with open(bad, "wb") as f:
        f.write(b"x")
    with pytest.raises(ValidationError, match=r"valid UTF-8.*caf\\xe9\.png"):
        list_images(tmp_path)
