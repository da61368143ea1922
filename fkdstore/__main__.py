"""``python -m fkdstore ...`` runs the command line (also under ``torchrun -m fkdstore generate ...``)."""

from .cli import main

raise SystemExit(main())
