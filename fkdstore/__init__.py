"""fkdstore: a versioned, chunked Zarr v3 format for Fast Knowledge Distillation soft labels.

Write labels once with :func:`write` (or :func:`generate` from a teacher), read them with :func:`open`,
replay crops and labels in training with :class:`TorchDataset`. The format is ``spec/format-v4.md``
(this library writes 4.0 and reads 4.0, and 3.0 / 2.0 written by fkdstore 0.2).

``import fkdstore`` is cheap: every name below is imported on first use (PEP 562), so ``fkdstore --version``
imports neither zarr nor torch. Reading, decoding, verify, inspect and convert need numpy and zarr only;
:func:`generate`, :class:`TorchDataset` and :class:`DeviceLoader` need torch (``fkdstore[torch]``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

# public name -> module that defines it (one table: the API, its lazy import and __all__)
_API = {
    "write": "writer", "Writer": "writer",
    "open": "reader", "Reader": "reader", "CropRecords": "reader", "MapRecords": "reader",
    "verify": "verification", "inspect": "report", "storage_stats": "report",
    "convert": "conversion", "prune": "conversion", "ensemble": "conversion",
    "import_fkd": "importers", "import_mldr": "importers", "import_tinyvit": "importers",
    "import_sre2l": "importers", "import_relabel": "importers",
    "SlotCropSampler": "seeded", "LabelMapSpec": "labelmap", "Replay": "transforms",
    "as_codec": "codecs", "from_config": "codecs", "get_codec": "codecs",
    "generate": "runner",
    "TorchDataset": "pytorch", "DeviceLoader": "pytorch", "collate": "pytorch", "densify": "pytorch",
    "soft_cross_entropy": "pytorch", "LabelMapDataset": "pytorch_maps",
    "as_source": "sources",
    "FkdstoreError": "errors", "FormatError": "errors", "ValidationError": "errors",
    "CorruptStoreError": "errors", "CorruptChunkError": "errors", "IncompleteStoreError": "errors",
    "SchemaMismatchError": "errors", "ConcurrentWriterError": "errors", "StorageError": "errors",
    "ConversionError": "errors", "ImageReadError": "errors", "LabelFileError": "errors",
    "ExternalReplayError": "errors",
}
_MODULES = ("augment", "codecs", "schema")

__all__ = ["__version__", *_MODULES, *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name.isidentifier() and not name.startswith("_"):  # a submodule: fkdstore.augment, fkdstore.report, ...
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'fkdstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
