"""Framing shared by host and guest: RFC 7464 JSON text sequences (RS json LF).

The implementation lives in ``guest.py`` (the guest must be one stdlib-only file); this module
re-exports it for the host with vmforge's own exception type.
"""

from __future__ import annotations

from typing import Any

from .. import errors
from . import guest

__all__ = ["encode", "Decoder", "FramingError", "RS", "MAX_RECORD"]

RS = guest.RS
MAX_RECORD = guest.MAX_RECORD
encode = guest.encode


class FramingError(errors.FramingError, guest.FramingError):
    """Malformed or truncated bytes on the agent channel."""


class Decoder(guest.Decoder):
    def finish(self) -> None:
        try:
            super().finish()
        except guest.FramingError as exc:
            raise FramingError(str(exc)) from None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return super().feed(data)
