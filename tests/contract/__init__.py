"""The etcd contract suite: one set of tests, every etcd backend."""
