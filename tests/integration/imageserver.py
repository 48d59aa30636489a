"""A disk image served on loopback the ways real servers (and networks) do it.

``mode``: ``length`` (Content-Length), ``chunked`` (HTTP/1.1 chunked encoding) or ``close``
(HTTP/1.0, the body ends when the connection closes). Faults: ``cut_next`` responses stop
half-way; ``rate`` throttles (bytes/s); ``hold_at`` pauses the first full-body response after
that many bytes until ``release`` is set (``held`` says it got there).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

IMAGE = os.urandom(3 * 1024 * 1024 + 123)  # a raw disk image
SHA = hashlib.sha256(IMAGE).hexdigest()
PIECE = 64 * 1024


class Server:
    def __init__(self, image: bytes = IMAGE, mode: str = "length") -> None:
        self.image = image
        self.sha = hashlib.sha256(image).hexdigest()
        self.mode = mode
        self.ranges: list[str | None] = []  # the Range header of each image request
        self.cut_next = 0
        self.rate: float | None = None
        self.hold_at: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0" if mode == "close" else "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/SHA256SUMS":
                    body = f"{'0' * 64}  other.img\n{outer.sha} *disk.img\n".encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path != "/disk.img":
                    self.send_error(404)
                    return
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                try:
                    self.serve(rng)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client died: what the crash tests do to it

            def serve(self, rng: str | None) -> None:
                image = outer.image
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start > len(image):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(image)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = image[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(image) - 1}/{len(image)}")
                if outer.mode == "length":
                    self.send_header("Content-Length", str(len(body)))
                elif outer.mode == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                cut = outer.cut_next > 0
                outer.cut_next -= cut
                hold = outer.hold_at if not rng else None
                if not rng:
                    outer.hold_at = None
                end = len(body) // 2 if cut else len(body)
                marks = {*range(0, end, PIECE), end}
                if hold is not None and hold < end:
                    marks.add(hold)
                bounds = sorted(marks)
                for a, b in zip(bounds, bounds[1:], strict=False):
                    if a == hold:
                        outer.held.set()
                        outer.release.wait(60)
                    self.send(body[a:b])
                    if outer.rate:
                        time.sleep((b - a) / outer.rate)
                if not cut and outer.mode == "chunked":
                    self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                if cut:
                    self.connection.shutdown(2)  # the network dies mid-download

            def send(self, data: bytes) -> None:
                if not data:
                    return
                if outer.mode == "chunked":
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                else:
                    self.wfile.write(data)
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def full_gets(self) -> int:
        return sum(r is None for r in self.ranges)
