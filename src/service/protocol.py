"""uvicorn's HTTP/1.1 protocol with a deadline for request headers.

uvicorn closes a keep-alive connection that stays idle, but not one that connects and then sends
its headers slowly or never (one byte of a request line cancels the idle timer): enough such
clients hold every connection open for good. This protocol gives the headers of each request
`timeout_s` from the moment the connection is ready for them (opened, or the last answer sent); a
client that has not finished them by then is disconnected. The body has its own deadline, with a
408 answer (`validate.read_json`).
"""
from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class whose connections close when a request's headers take over `timeout_s`."""

    class HeaderDeadlineH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._waiting_for_headers():  # the headers are in: the app has the request
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._waiting_for_headers():
                self._arm()  # the next request's headers get their own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.logger.info("closing a connection whose request headers did not arrive within %g s", timeout_s)
                self.transport.close()

    return HeaderDeadlineH11
