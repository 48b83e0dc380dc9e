"""A fault-injecting HTTP proxy for an S3 server (moto on loopback), for the object-store fault tests.

Every request is read whole, then, by a seeded coin:

- ``fault_rate`` of them get 503 SlowDown or 500 InternalError without reaching the server;
- ``lost_rate`` of them reach the server, which carries them out, but the client gets 500 instead of the
  answer (a response lost on the way back: the client's retry repeats a request that already happened);
- ``delay_rate`` of them are held for up to ``max_delay`` seconds first;
- the rest are forwarded as they are.

``counts`` says how many of each the proxy served.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERRORS = {
    503: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
         b'<Message>Please reduce your request rate.</Message><RequestId>faultproxy</RequestId></Error>',
    500: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
         b'<Message>We encountered an internal error. Please try again.</Message><RequestId>faultproxy</RequestId>'
         b'</Error>',
}
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "content-length"}


class FaultProxy:
    def __init__(self, upstream: str, fault_rate: float = 0.07, lost_rate: float = 0.03, delay_rate: float = 0.1,
                 max_delay: float = 0.3, seed: int = 0):
        self.upstream = urlsplit(upstream)
        self.fault_rate, self.lost_rate, self.delay_rate, self.max_delay = fault_rate, lost_rate, delay_rate, max_delay
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "faults": 0, "lost": 0, "delayed": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int) -> None:
                body = ERRORS[status]
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, body: bytes):
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                return resp, data

            def _handle(self) -> None:
                body = self._body()
                fault, lost, delay = proxy._draw()
                if delay:
                    time.sleep(delay)
                if fault:
                    return self._error(fault)
                resp, data = self._forward(body)
                if lost:
                    return self._error(500)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _draw(self) -> tuple[int | None, bool, float]:
        with self.lock:
            self.counts["requests"] += 1
            r = self.rng.random()
            fault = self.rng.choice((500, 503)) if r < self.fault_rate else None
            lost = fault is None and r < self.fault_rate + self.lost_rate
            delay = self.rng.uniform(0, self.max_delay) if self.rng.random() < self.delay_rate else 0.0
            self.counts["faults"] += fault is not None
            self.counts["lost"] += lost
            self.counts["delayed"] += delay > 0
            return fault, lost, delay

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
