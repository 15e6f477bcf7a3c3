"""A replicated key-value store built on clusterkit (see ``node.py`` and ``demo.py``)."""
