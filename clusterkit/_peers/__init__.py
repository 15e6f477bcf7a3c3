"""The peer transport: msgpack frames over trio-websocket, authenticated by a shared secret.

Pure parts (frame codec, challenge-response) live here first; the connection pool, server
and migration service build on them.
"""
