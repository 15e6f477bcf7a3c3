"""The etcd adapter: generated stubs, the Trio bridge, the typed client, embedded etcd.

This package is the only code in clusterkit that imports ``grpc``.
"""
