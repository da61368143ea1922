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
from .mldr import import_mldr
from .relabel import import_relabel
from .sre2l import import_sre2l
from .tinyvit import import_tinyvit

__all__ = ["IMPORTERS", "import_fkd", "import_mldr", "import_relabel", "import_sre2l", "import_tinyvit"]

IMPORTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "fkd": import_fkd, "mldr": import_mldr, "tinyvit": import_tinyvit, "sre2l": import_sre2l,
    "relabel": import_relabel}
"""``fkdstore import <name>``: ``import_<name>(src, dst, images, ...) -> summary dict``. ``fkd``: FKD's release
files (per image); ``mldr``: Apple's ml-dr reinforcement files (per dataset id); ``tinyvit``: TinyViT's saved
logits (per epoch and rank, bound by key; seeds of timm's pipeline); ``sre2l``: SRe2L / LPLD / LPQLD batch
files (bound by the recorded sampler order); ``relabel``: ReLabel's / TokenLabeling's per-image ``.pt`` label maps
(a label-map store, bound by key)."""
