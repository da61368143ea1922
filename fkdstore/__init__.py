"""fkdstore: a versioned, chunked Zarr v3 format for Fast Knowledge Distillation soft labels.

Write labels once with :func:`write` (or :func:`generate` from a teacher), read them with :func:`open`,
replay crops and labels in training with :class:`TorchDataset`. The format is ``spec/format-v3.md``
(format 2.0, and 3.0 for seeded crops, :mod:`fkdstore.seeded`; stores of format 1.0, ``spec/format-v1.md``,
are still read).

``import fkdstore`` needs numpy and zarr only: reading, decoding, verify, inspect and convert work without
torch; :func:`generate` and :class:`TorchDataset` import torch on first use.
"""

__version__ = "0.2.0"

from . import augment, codecs, schema  # noqa: E402
from .codecs import as_codec, from_config, get_codec  # noqa: E402
from .convert import ensemble, prune  # noqa: E402
from .errors import (  # noqa: E402
    ConcurrentWriterError,
    CorruptChunkError,
    CorruptStoreError,
    FkdstoreError,
    FormatError,
    IncompleteStoreError,
    SchemaMismatchError,
    ValidationError,
)
from .reader import CropRecords, Reader, open  # noqa: E402,A004
from .seeded import SlotCropSampler  # noqa: E402
from .writer import Writer, write  # noqa: E402,A004

_LAZY = {  # torch entry points, imported on first use so that ``import fkdstore`` needs no torch
    "generate": "runner",
    "TorchDataset": "pytorch",
    "DeviceLoader": "pytorch",
    "collate": "pytorch",
    "densify": "pytorch",
    "soft_cross_entropy": "pytorch",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fkdstore' has no attribute {name!r}")


__all__ = [
    "__version__", "augment", "codecs", "schema", "as_codec", "from_config", "get_codec", "write", "open",
    "Reader", "Writer", "CropRecords", "SlotCropSampler", "prune", "ensemble", "FkdstoreError", "FormatError", "IncompleteStoreError",
    "SchemaMismatchError", "ValidationError", "CorruptStoreError", "CorruptChunkError", "ConcurrentWriterError",
    *_LAZY,
]
