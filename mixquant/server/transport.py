"""Connections the server survives: uvicorn's HTTP/1.1 protocol with a deadline for reading each
request (head and body) and a cap on open connections that keeps file descriptors in reserve.

A client that opens connections and sends part of its headers (or trickles a body) holds a
descriptor each; without limits a few thousand of them exhaust the process's descriptors, after
which `accept()` fails for everyone. Here a request must arrive whole within READ_SECONDS, and
when the cap is reached the longest-waiting connection with no request in progress is closed to
make room, so a health check or a real client still gets in.
"""

from __future__ import annotations

import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

READ_SECONDS = 30.0  # from a connection's start (or the end of its last response) to a whole request
DESCRIPTOR_RESERVE = 64  # files the process keeps for itself: model files, logs, the listening socket
MAX_CONNECTIONS = 4096


def connection_cap(wanted: int | None = None) -> int:
    """Raise the soft descriptor limit to the hard one, and return how many connections fit under
    it with DESCRIPTOR_RESERVE to spare (at most `wanted`, when given)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(8, min(wanted or MAX_CONNECTIONS, soft - DESCRIPTOR_RESERVE))


class GuardedH11Protocol(H11Protocol):
    cap = MAX_CONNECTIONS  # set by the server from connection_cap()
    read_seconds = READ_SECONDS

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._waiting_since = time.monotonic()
        self._read_timer = None
        if len(self.connections) > self.cap and not self._make_room():
            self.transport.close()
            return
        self._arm()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest without a request in progress."""
        idle = [c for c in self.connections if c is not self and getattr(c, "_read_timer", None) is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._waiting_since)
        oldest._expire()
        return True

    def _arm(self) -> None:
        self._disarm()
        self._waiting_since = time.monotonic()
        self._read_timer = self.loop.call_later(self.read_seconds, self._expire)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _expire(self) -> None:
        """Out of time (or of room) before the request arrived whole: drop the connection."""
        self._disarm()
        self.connections.discard(self)
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the request is in: the response may take as long as generation takes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)
