"""``python -m gradstats ...``: the same as the ``gradstats`` command."""
from .cli import main

raise SystemExit(main())
