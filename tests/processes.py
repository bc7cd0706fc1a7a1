"""Helpers for tests that start several processes."""

import socket


def free_port() -> int:
    """A free TCP port on localhost, for a launcher's rendezvous (--main_process_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
