"""``python -m gradstats ...``: the same as the ``gradstats`` command."""
from .apps.cli import main

raise SystemExit(main())
