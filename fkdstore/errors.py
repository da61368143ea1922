"""Every exception fkdstore raises on purpose. Each message names the array, attribute, file or argument
and the rule broken, then what was got ("<rule>. Got <value>.").

Wrong *types* raise the built-in :class:`TypeError`; bad *values* raise :class:`ValidationError` (a
:class:`ValueError`). Damage found in a store raises :class:`CorruptStoreError`.
"""


class FkdstoreError(Exception):
    """Base class of every error fkdstore raises on purpose."""


class FormatError(FkdstoreError):
    """The path is not an fkdstore store, or its format version/attributes cannot be read by this library."""


class ValidationError(FkdstoreError, ValueError):
    """Input to a writer, codec, policy or sampler breaks a rule of the format (shape, range, dtype, sum)."""


class SchemaMismatchError(FkdstoreError):
    """An existing store was re-opened for writing with different parameters."""


class IncompleteStoreError(FkdstoreError):
    """An image (or the whole store) was read before it was written."""


class CorruptStoreError(FkdstoreError):
    """A store's data is missing, misplaced or inconsistent with its header: a missing shard or chunk of a
    written image, a chunk at the wrong position (manifest mismatch), a checksum failure, a header whose
    checksum or layout disagrees with the arrays. The message names the array, the file/key and the images."""


class CorruptChunkError(CorruptStoreError):
    """A chunk's bytes fail their crc32c checksum or cannot be decoded (kept as its own class since 0.1)."""


class ConcurrentWriterError(FkdstoreError):
    """Another writer owns the shard this writer was about to write (two writers on one shard lose data)."""


class StorageError(FkdstoreError):
    """A store's location cannot be reached: a URL whose scheme no installed filesystem handles or that
    names no bucket, a missing bucket, credentials the server refuses (or none found), an endpoint that does
    not answer. The one-line message names the URL and the cause (:func:`fkdstore.storage.check_reachable`)."""


class ConversionError(FkdstoreError):
    """The requested conversion needs information the source does not hold (e.g. a codec cannot be derived
    from another), with the reason."""


class ImageReadError(FkdstoreError):
    """An image file exists but cannot be decoded (truncated, corrupt or unsupported)."""


class LabelFileError(ValidationError):
    """A label file of another system (e.g. a ReLabel ``.pt`` map) cannot be loaded (truncated, not a torch
    file, unsafe to unpickle) or breaks that system's layout (shape, dtype, index rule). The message names
    the file and the rule."""


class ExternalReplayError(FkdstoreError):
    """A store's crops were augmented by another library's pipeline from stored seeds (e.g. TinyViT's timm
    pipeline); fkdstore cannot replay those pixels. The message names the library and how to pass a replay."""
