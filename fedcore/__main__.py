"""``python -m fedcore``: the ``fedcore`` command (how ``fedcore launch`` starts its processes)."""

from .experiments.cli import main

raise SystemExit(main())
