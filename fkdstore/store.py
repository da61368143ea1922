"""fkdstore 0.1 module names, kept so 0.1 code keeps importing: the writer lives in
:mod:`fkdstore.writer`, the reader in :mod:`fkdstore.reader`. New code should import from those (or from
``fkdstore`` itself). This module holds no logic."""

from __future__ import annotations

from . import schema as S
from .errors import CorruptChunkError
from .reader import CropRecords, Reader, open  # noqa: A004
from .writer import Writer, storage_stats, write

__all__ = ["write", "open", "Writer", "Reader", "CropRecords", "CorruptChunkError", "array_names", "storage_stats"]


def array_names(codec, num_classes: int, num_aug: int) -> list[str]:
    """Per-crop array names of a format-1.0 store with ``num_aug`` aug columns (0.1 helper). For any store
    use ``Reader.per_crop_arrays`` or ``Header.per_crop_specs(codec)``."""
    names = [S.BOX, S.FLIP] + ([S.AUG] if num_aug else [])
    return names + [S.soft_path(f) for f in codec.fields(num_classes)]
