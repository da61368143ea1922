"""Listing and loading the images a store is built from.

``list_images`` fixes the image order (and hence each image's index, which seeds its crops);
``load_image`` decodes strictly, so a truncated file fails loudly instead of being labelled
with grey padding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from .errors import ImageReadError, ValidationError

__all__ = ["IMAGE_EXTENSIONS", "ImageList", "ImageReadError", "list_images", "load_image", "image_size",
           "is_image_name", "class_labels"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)


@dataclass(frozen=True)
class ImageList:
    """An ordered set of images; position ``i`` is the image's index in the store.

    ``root`` is the scanned folder, or None for an explicit file list. ``keys`` are relative
    posix paths under ``root`` (sorted) or the paths exactly as given (given order).
    ``paths`` are absolute. ``labels`` are class indices into ``classes`` (sorted names of the
    class sub-folders of ``root``, as torchvision's ImageFolder), -1 when an image has no class.
    """

    root: str | None
    keys: list[str]
    paths: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def is_image_name(name: str) -> bool:
    """True when ``name`` ends with an image extension (case-insensitive; see ``IMAGE_EXTENSIONS``)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS



def class_labels(keys: Sequence[str]) -> tuple[list[int], list[str]]:
    """``(labels, classes)`` of relative posix keys by ImageFolder's rule: the first path component names the
    class, ``classes`` are the sorted names, a key without a folder part gets label -1."""
    classes = sorted({k.split("/", 1)[0] for k in keys if "/" in k})
    class_index = {c: i for i, c in enumerate(classes)}
    return [class_index[k.split("/", 1)[0]] if "/" in k else -1 for k in keys], classes


def list_images(images: str | os.PathLike | Sequence[str | os.PathLike]) -> ImageList:
    """List images from a folder (recursive) or from an explicit sequence of file paths.

    Folder: every file with an image extension (case-insensitive; see ``IMAGE_EXTENSIONS``)
    below ``images``, sorted by its relative posix path; hidden files and folders (a name starting
    with ``.``: ``.ipynb_checkpoints``, macOS ``._*`` files) are skipped. The first path component names the
    class (sorted class names give the label, as ImageFolder); files directly in the root get
    label -1. Sequence: keys are the paths as given, in the given order, labels -1; duplicates
    are rejected. Raises FileNotFoundError for a missing path and ValidationError when no
    image is found.
    """
    if isinstance(images, (str, os.PathLike)):
        return _list_folder(Path(images))
    if not isinstance(images, Sequence):
        raise ValidationError(f"images must be a folder path or a list of file paths, got {type(images).__name__}")
    keys = [os.fspath(p) for p in images]
    if not keys:
        raise ValidationError("no images found in the given (empty) file list")
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise ValidationError(f"file list must not repeat a path, got {key!r} twice")
        seen.add(key)
        if not os.path.isfile(key):
            raise FileNotFoundError(f"image file not found: {key}")
    paths = [os.path.abspath(k) for k in keys]
    return ImageList(root=None, keys=keys, paths=paths, labels=[-1] * len(keys), classes=[])


def _list_folder(root: Path) -> ImageList:
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ValidationError(f"images must be a folder or a list of files, got the file {root}")
    root = root.resolve()
    keys: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()  # (device, inode) of every folder entered: symlinked folders are
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # followed, each at most once
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            raise ValidationError(
                f"image folder {root} contains a symlink loop (or two links to one folder): "
                f"{dirpath} was already listed; remove the link"
            )
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        filenames = [f for f in filenames if not f.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        for name in (*dirnames, *filenames):
            _check_utf8_name(Path(dirpath) / name)
        keys.extend((rel / name).as_posix() for name in filenames if is_image_name(name))
    if not keys:
        raise ValidationError(f"no images found under {root} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    keys.sort()
    labels, classes = class_labels(keys)
    paths = [str(root.joinpath(*k.split("/"))) for k in keys]
    return ImageList(root=str(root), keys=keys, paths=paths, labels=labels, classes=classes)


def _check_utf8_name(path: Path) -> None:
    """Image keys are UTF-8 (spec 2.0): a file or folder name that is not valid UTF-8 (Python shows its
    undecodable bytes as surrogate escapes) is refused before anything is written, naming its raw bytes."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(path.name)
        raise ValidationError(
            f"image file and folder names must be valid UTF-8 (they become the store's keys). "
            f"Got {raw!r} in {os.fsencode(path.parent)!r}; rename it"
        ) from None


def load_image(path: str | os.PathLike | BinaryIO, *, name: str | None = None) -> Image.Image:
    """Open, fully decode and convert an image to RGB.

    ``path``: a file path or a binary file object (encoded bytes from a shard or object storage); ``name``
    names it in errors (default: the path). Decoding is strict (``ImageFile.LOAD_TRUNCATED_IMAGES`` is
    left alone): a truncated or undecodable file raises :class:`ImageReadError` naming the path (or
    ``name``) and the cause; a missing file raises FileNotFoundError. EXIF orientation is not applied
    (as ImageFolder).
    """
    name = _name(path, name)
    try:
        with Image.open(path) as img:
            img.load()
            # An RGB image is returned as decoded (convert would copy it); the file is closed on exit,
            # the decoded pixels stay.
            return img if img.mode == "RGB" else img.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image {name}: {exc}") from exc


def image_size(path: str | os.PathLike | BinaryIO, *, name: str | None = None) -> tuple[int, int]:
    """``(height, width)`` of an image, read from its header without decoding the pixels (``path`` and
    ``name`` as for :func:`load_image`)."""
    name = _name(path, name)
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image header {name}: {exc}") from exc
    return int(height), int(width)


def _name(path, name: str | None) -> str:
    if name is not None:
        return name
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else repr(path)
