"""A real HTTP(S) server on 127.0.0.1 for client tests: it echoes each request's id and the
client's source port, and logs both, so a test can see which TCP connection carried a request.

``GET /?id=X`` answers ``X <source port>`` over HTTP/1.1 keep-alive. With ``tls=True`` the
server uses a certificate from a throwaway trustme CA; clients verify it with ``ca_path``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from helpers import LONG


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one TCP connection carries many requests
    timeout = LONG  # an idle keep-alive connection does not hold its thread forever
    server: _Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(LONG)
            self.request.do_handshake()  # in this handler thread, not the accept loop
        super().setup()

    def do_GET(self) -> None:
        request_id = parse_qs(urlsplit(self.path).query).get("id", [""])[0]
        port = self.client_address[1]
        self.server.record(request_id, port)
        body = f"{request_id} {port}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.tls = tls
        self.lock = threading.Lock()
        self.log: list[tuple[str, int]] = []
        self.errors: list[str] = []
        self.connections: list[socket.socket] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self.lock:
            self.connections.append(sock)
        return sock, address

    def record(self, request_id: str, port: int) -> None:
        with self.lock:
            self.log.append((request_id, port))

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A connection a test broke on purpose (e.g. a scrambled TLS stream): note, don't print.
        import sys

        exc = sys.exc_info()[1]
        with self.lock:
            self.errors.append(f"{type(exc).__name__}: {exc}")


class EchoServer:
    """``with EchoServer(tmp_path, tls=...) as server:`` -- ``server.url``, ``server.ca_path``."""

    def __init__(self, tmp_path: Path, *, tls: bool = False) -> None:
        context = None
        self.ca_path: str | bool = True
        if tls:
            import trustme

            ca = trustme.CA()
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(context)
            path = tmp_path / "ca.pem"
            ca.cert_pem.write_to_path(str(path))
            self.ca_path = str(path)
        self._server = _Server(context)
        host, port = self._server.server_address[:2]
        self.url = f"{'https' if tls else 'http'}://{host}:{port}/"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def ports(self, prefix: str) -> list[int]:
        """Source ports of the requests whose id starts with ``prefix``, in arrival order."""
        with self._server.lock:
            return [port for rid, port in self._server.log if rid.startswith(prefix)]

    def port_of(self, request_id: str) -> int:
        with self._server.lock:
            ports = [port for rid, port in self._server.log if rid == request_id]
        if len(ports) != 1:
            raise AssertionError(f"request {request_id!r} logged {len(ports)} times")
        return ports[0]

    @property
    def errors(self) -> list[str]:
        with self._server.lock:
            return list(self._server.errors)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(LONG)
        with self._server.lock:
            connections = list(self._server.connections)
        for sock in connections:  # wake handler threads parked on idle keep-alive connections
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
