"""fkdstore: a versioned, chunked Zarr v3 format for Fast Knowledge Distillation soft labels.

Write labels once with :func:`write` (or :func:`generate` from a teacher), read them with :func:`open`,
replay crops and labels in training with :class:`TorchDataset`. The format is ``spec/format-v1.md``.
"""

__version__ = "0.1.0"

from . import codecs, schema  # noqa: E402
from .codecs import from_config, get_codec  # noqa: E402
from .errors import (  # noqa: E402
    FkdstoreError,
    FormatError,
    IncompleteStoreError,
    SchemaMismatchError,
    ValidationError,
)
from .store import CorruptChunkError, CropRecords, Reader, Writer, open, write  # noqa: E402,A004

# The teacher-runner function shadows its module's name: bind the function here, after the submodule is
# loaded, so ``import fkdstore.generate`` elsewhere can never rebind ``fkdstore.generate`` to the module.
from .generate import generate  # noqa: E402

_LAZY = {  # torch-data entry points, imported on first use
    "TorchDataset": "pytorch",
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
    "__version__", "codecs", "schema", "from_config", "get_codec", "write", "open", "Reader", "Writer",
    "CropRecords", "FkdstoreError", "FormatError", "IncompleteStoreError", "SchemaMismatchError",
    "ValidationError", "CorruptChunkError", "generate", *_LAZY,
]
