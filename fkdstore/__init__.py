"""fkdstore: a versioned, chunked Zarr v3 format for Fast Knowledge Distillation soft labels.

Write labels once with :func:`write` (or :func:`generate` from a teacher), read them with :func:`open`,
replay crops and labels in training with :class:`TorchDataset`. The format is ``spec/format-v3.md``
(format 2.0, and 3.0 for seeded crops, :mod:`fkdstore.seeded`; stores of format 1.0, ``spec/format-v1.md``,
are still read).

``import fkdstore`` is cheap: only the exceptions are imported with the package; every other name is
imported on first use (PEP 562 ``__getattr__``), so ``fkdstore --version`` imports neither zarr nor torch.
Reading, decoding, verify, inspect and convert need numpy and zarr only; :func:`generate`,
:class:`TorchDataset` and :class:`DeviceLoader` import torch.
"""

__version__ = "0.2.0"

from .errors import (  # noqa: E402 - light: plain exception classes
    ConcurrentWriterError,
    CorruptChunkError,
    CorruptStoreError,
    FkdstoreError,
    FormatError,
    IncompleteStoreError,
    SchemaMismatchError,
    ValidationError,
)

_LAZY = {  # public name -> (submodule, attribute; None: the submodule itself), imported on first use
    "augment": ("augment", None),
    "codecs": ("codecs", None),
    "schema": ("schema", None),
    "as_codec": ("codecs", "as_codec"),
    "from_config": ("codecs", "from_config"),
    "get_codec": ("codecs", "get_codec"),
    "ensemble": ("convert", "ensemble"),
    "prune": ("convert", "prune"),
    "CropRecords": ("reader", "CropRecords"),
    "Reader": ("reader", "Reader"),
    "open": ("reader", "open"),
    "SlotCropSampler": ("seeded", "SlotCropSampler"),
    "Writer": ("writer", "Writer"),
    "write": ("writer", "write"),
    "generate": ("runner", "generate"),  # torch
    "TorchDataset": ("pytorch", "TorchDataset"),  # torch
    "DeviceLoader": ("pytorch", "DeviceLoader"),  # torch
    "collate": ("pytorch", "collate"),  # torch
    "densify": ("pytorch", "densify"),  # torch
    "soft_cross_entropy": ("pytorch", "soft_cross_entropy"),  # torch
}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(f".{module}", __name__)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value  # later lookups skip this function
        return value
    if name.isidentifier() and not name.startswith("__"):  # any other submodule: fkdstore.report, fkdstore.verify
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'fkdstore' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__", "FkdstoreError", "FormatError", "IncompleteStoreError", "SchemaMismatchError", "ValidationError",
    "CorruptStoreError", "CorruptChunkError", "ConcurrentWriterError", *_LAZY,
]
