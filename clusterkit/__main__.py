"""``python -m clusterkit``: the ``clusterkit`` command (see :mod:`clusterkit.cli`)."""

from clusterkit.cli import main

raise SystemExit(main())
