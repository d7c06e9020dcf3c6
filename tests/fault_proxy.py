"""A loopback HTTP proxy in front of an emulator that records requests and answers chosen ones with a 503 or a
TCP reset, or never answers them (a bucket that accepts connections and goes silent), so the SDKs' own retry policies
and the stall watchdog are exercised against real servers."""

from __future__ import annotations

import http.client
import re
import socket
import socketserver
import struct
import sys
import threading
from dataclasses import dataclass
from http import server as http_server

SERVICE_UNAVAILABLE = "503"
CONNECTION_RESET = "reset"
NO_ANSWER = "hang"  # the request is read, then nothing is sent back until the proxy stops
MAX_REQUESTS = 20_000  # a runaway retry loop ends here instead of running until the test times out
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "expect"}


@dataclass
class _Rule:
    fault: str
    method: str | None
    pattern: re.Pattern[str]
    remaining: int


@dataclass(frozen=True)
class SeenRequest:
    method: str
    target: str  # path and query as sent
    fault: str | None
    ranged: bool  # asked for a byte range (Range or x-ms-range header): one part of a parallel download


class _Handler(http_server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_ProxyServer"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _relay(self) -> None:
        body = self._read_body()
        ranged = "Range" in self.headers or "x-ms-range" in self.headers
        fault = self.server.proxy.decide(self.command, self.path, ranged)
        if fault == NO_ANSWER:
            self.server.proxy.stopping.wait()
            self.close_connection = True
            return
        if fault == CONNECTION_RESET:
            # SO_LINGER 0 turns close() into an RST: the client sees "connection reset by peer" mid-request.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if fault == SERVICE_UNAVAILABLE:
            self._send(503, [("Content-Type", "text/plain")], b"injected fault: service unavailable")
            return
        headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        upstream = self.server.proxy.upstream_connection()
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            response_headers = [(n, v) for n, v in response.getheaders() if n.lower() not in _HOP_BY_HOP]
            self._send(response.status, response_headers, payload, keep_length=self.command == "HEAD")
        finally:
            upstream.close()

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, keep_length: bool = False) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() != "content-length" or keep_length:
                self.send_header(name, value)
        if not keep_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _relay


class _ProxyServer(socketserver.ThreadingMixIn, http_server.HTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, proxy: "FaultProxy") -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request, client_address) -> None:
        # Clients drop idle keep-alive connections at exit; only unexpected errors are worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FaultProxy:
    """Forwards http://127.0.0.1:<port> to an upstream loopback port; inject() arms faults, requests lists traffic."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests: list[SeenRequest] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.stopping = threading.Event()  # releases the requests held unanswered
        self._server = _ProxyServer(self)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def inject(self, fault: str, *, method: str | None = None, path_regex: str = "", times: int = 1) -> None:
        """The next `times` requests with this method whose path+query matches path_regex get the fault."""
        if fault not in (SERVICE_UNAVAILABLE, CONNECTION_RESET, NO_ANSWER):
            raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            self._rules.append(_Rule(fault, method, re.compile(path_regex), times))

    def clear(self) -> None:
        """Disarms every fault not yet used: the store is healthy again."""
        with self._lock:
            self._rules.clear()

    def decide(self, method: str, target: str, ranged: bool = False) -> str | None:
        with self._lock:
            if len(self.requests) >= MAX_REQUESTS:
                return CONNECTION_RESET
            fault = None
            for rule in self._rules:
                if rule.remaining > 0 and rule.method in (None, method) and rule.pattern.search(target):
                    rule.remaining -= 1
                    fault = rule.fault
                    break
            self.requests.append(SeenRequest(method, target, fault, ranged))
            return fault

    def upstream_connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)

    def count(self, *, method: str | None = None, path_regex: str = "", faulted: bool | None = None,
              ranged: bool | None = None) -> int:
        pattern = re.compile(path_regex)
        with self._lock:
            return sum(1 for seen in self.requests
                       if method in (None, seen.method) and pattern.search(seen.target)
                       and (faulted is None or (seen.fault is not None) == faulted)
                       and (ranged is None or seen.ranged == ranged))

    def pending_faults(self) -> int:
        with self._lock:
            return sum(rule.remaining for rule in self._rules)

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class BlackHole:
    """A loopback port that accepts every connection and never sends a byte: a bucket endpoint gone silent."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._server.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.accepted: list[socket.socket] = []  # held open, unanswered
        self._thread = threading.Thread(target=self._accept, name="black-hole", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return  # closed by stop()
            self.accepted.append(connection)

    def stop(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() in progress
        except OSError:
            pass
        self._server.close()
        for connection in self.accepted:
            connection.close()
