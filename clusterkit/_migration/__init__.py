"""Partition migration: the schema in ``protos/migration`` and the service built on it."""
