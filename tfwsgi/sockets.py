"""A process's TCP sockets on one local port, read from Linux's /proc (``/proc/net/tcp{,6}`` for
the sockets, ``/proc/<pid>/fd`` for who holds them): what a stopping worker needs to know to
drain its gRPC connections (``grpc_api.drain``), which grpcio does not tell. Stdlib only."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN, as /proc/net/tcp writes it
_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


@dataclass(frozen=True)
class Entry:
    """One row of /proc/net/tcp{,6}: the local port, the state (hex) and the socket's inode."""

    port: int
    state: str
    inode: str


def parse_table(text: str) -> list[Entry]:
    """The rows of a /proc/net/tcp{,6} table (its header line skipped)."""
    entries = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        entries.append(Entry(int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]))
    return entries


def _entries(port: int) -> list[Entry]:
    entries: list[Entry] = []
    for table in _TABLES:
        try:
            entries += [e for e in parse_table(Path(table).read_text()) if e.port == port]
        except OSError:  # no IPv6, or not Linux
            continue
    return entries


def _fds(pid: int | str = "self") -> dict[str, int]:
    """The process's socket inodes and a descriptor of each."""
    held: dict[str, int] = {}
    directory = Path(f"/proc/{pid}/fd")
    for fd in directory.iterdir():
        try:
            link = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            held.setdefault(link[8:-1], int(fd.name))
    return held


def connections(port: int, pid: int | str = "self") -> int:
    """Connections on local ``port`` that process ``pid`` still holds (any state but LISTEN)."""
    held = _fds(pid)
    return sum(1 for e in _entries(port) if e.state != LISTEN and e.inode in held)


def others_listen(port: int) -> bool:
    """Whether a socket this process does not hold listens on ``port``."""
    held = _fds()
    return any(e.state == LISTEN and e.inode not in held for e in _entries(port))


def stop_listening(port: int) -> int:
    """Shut down this process's listening sockets on ``port`` (leaving the SO_REUSEPORT group,
    so the kernel gives new connections to the other listeners) without closing the descriptors
    their owner holds; how many were shut down."""
    held = _fds()
    done = 0
    for entry in _entries(port):
        if entry.state == LISTEN and entry.inode in held:
            with socket.socket(fileno=os.dup(held[entry.inode])) as sock:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    done += 1
                except OSError:
                    continue
    return done
