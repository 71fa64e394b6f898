"""A TCP relay on the loopback that keeps every byte it forwards: what a tap on the wire between
two hosts would see (here, between two QEMUs migrating). Hand-written: a capture library would
need raw-socket privileges for the same bytes.

    with Relay(dest_port) as relay:
        ... connect to relay.port ...
    relay.seen(b"secret")        # the bytes went past in the clear?
"""

from __future__ import annotations

import selectors
import socket
import threading


class Relay:
    """Accepts connections on 127.0.0.1:``port`` and forwards each to 127.0.0.1:``target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.data = bytearray()           # both directions, in arrival order (memory only)
        self._listen = socket.create_server(("127.0.0.1", 0))
        self.port = self._listen.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(10)
        self._listen.close()

    def seen(self, needle: bytes) -> bool:
        return needle in self.data

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        self._listen.setblocking(False)
        sel.register(self._listen, selectors.EVENT_READ)
        peers: dict[socket.socket, socket.socket] = {}
        while not self._stop:
            for key, _ in sel.select(0.05):
                sock = key.fileobj
                if sock is self._listen:
                    client, _ = self._listen.accept()
                    upstream = socket.create_connection(("127.0.0.1", self.target))
                    for s in (client, upstream):
                        s.setblocking(False)
                        sel.register(s, selectors.EVENT_READ)
                    peers[client], peers[upstream] = upstream, client
                    continue
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                other = peers.get(sock)
                if not chunk or other is None:
                    for end in (sock, other):
                        if end is not None and end in peers:
                            sel.unregister(end)
                            peers.pop(end, None)
                            end.close()
                    continue
                self.data += chunk
                other.setblocking(True)
                other.sendall(chunk)
                other.setblocking(False)
        for s in peers:
            s.close()
        sel.close()
