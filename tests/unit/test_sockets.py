"""tfwsgi.sockets against real loopback sockets: what a stopping worker reads from /proc."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tfwsgi import sockets

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")


def test_parse_table_reads_port_state_and_inode() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 00000000:2134 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000  0 4242 1 0\n"
        "   1: 0100007F:2134 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000  0 4243 1 0\n")
    assert sockets.parse_table(text) == [sockets.Entry(8500, "0A", "4242"), sockets.Entry(8500, "01", "4243")]


def _listener(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with _listener() as sock:
        yield sock


def test_stop_listening_refuses_new_connections_and_keeps_the_open_ones(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as client:
        conn, _ = listener.accept()
        with conn:
            assert sockets.connections(port) == 1  # the accepted end; the client's is on another port
            assert sockets.stop_listening(port) == 1
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"  # the descriptor stays open and the connection works
            assert sockets.connections(port) == 1
        client.close()
    assert sockets.connections(port) == 0
    assert sockets.stop_listening(port) == 0


def test_others_listen_sees_only_other_processes(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert not sockets.others_listen(port)
    code = ("import socket, sys; s = socket.socket(); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); sys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as other:
        try:
            assert other.stdout is not None and other.stdout.readline() == "up\n"
            assert sockets.others_listen(port)
        finally:
            assert other.stdin is not None
            other.stdin.close()
            other.wait(timeout=10)
    assert not sockets.others_listen(port)
