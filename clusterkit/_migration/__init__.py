"""Partition migration: the schema in ``protos/migration`` and the service built on it
(``service.py``: ``ck.migration``, the msgpack mapping of the schema over a peer stream)."""
