"""The actors of a clusterkit node, each started by ``open_cluster`` in its one nursery."""
