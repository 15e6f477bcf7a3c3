"""The pure core: hashing, assignment, diffs and codecs. No I/O, no trio, no grpc."""
