"""Test doubles that clusterkit ships to its users; the public face is :mod:`clusterkit.testing`."""
