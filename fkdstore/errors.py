"""Exceptions raised by fkdstore. Every message names the array, attribute or argument and the rule broken."""


class FkdstoreError(Exception):
    """Base class of every error fkdstore raises on purpose."""


class FormatError(FkdstoreError):
    """The path is not an fkdstore store, or its format version/attributes cannot be read by this library."""


class ValidationError(FkdstoreError, ValueError):
    """Input to a writer, codec or sampler breaks a rule of the format (shape, range, dtype, normalisation)."""


class SchemaMismatchError(FkdstoreError):
    """An existing store was re-opened for writing with different parameters."""


class IncompleteStoreError(FkdstoreError):
    """An image (or the whole store) was read before it was written."""
