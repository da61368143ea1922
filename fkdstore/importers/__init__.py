"""Importers of other systems' label files into fkdstore (one module per system: :mod:`.relabel` for
ReLabel's and TokenLabeling's per-image label maps). Each module imports its heavy dependencies (torch)
lazily, so ``import fkdstore.importers`` needs numpy only.
"""
