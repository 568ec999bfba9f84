"""``python -m lorakit`` runs the ``lorakit`` command."""

from lorakit.cli import main

raise SystemExit(main())
