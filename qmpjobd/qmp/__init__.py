"""The QMP protocol, sans-IO: bytes in, messages and replies out. No trio, no sockets."""
