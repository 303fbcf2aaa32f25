"""``python -m gradcore``: the same as the ``gradcore`` command."""

from .cli import main

raise SystemExit(main())
