"""Importers: label sets written by other systems become keyed, checksummed fkdstore stores.

One module per source format; :data:`IMPORTERS` maps the name used by ``fkdstore import <name>`` to the
function. Every importer binds each record to its image by key, streams with bounded memory, records its
source in ``meta["import"]`` and ``meta["history"]``, and loads pickled files only through the safe loader of
:mod:`fkdstore.importers.safe_pickle` (no code from a file is ever executed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .fkd import import_fkd

__all__ = ["IMPORTERS", "import_fkd"]

IMPORTERS: dict[str, Callable[..., dict[str, Any]]] = {"fkd": import_fkd}
