#!/usr/bin/env python3
"""A tiny daemon for the golden-image example: answers GET /health on port 2280."""

from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        ok = self.path == "/health"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"ok\n" if ok else b"not found\n")

    def log_message(self, *args: object) -> None:
        pass


HTTPServer(("0.0.0.0", 2280), Handler).serve_forever()
