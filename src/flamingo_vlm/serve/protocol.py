"""uvicorn's h11 HTTP protocol with a timeout on request headers.

uvicorn times out idle keep-alive connections only after a response, and cancels even that timer
as soon as any byte arrives: a client that opens a connection (or sends part of its headers) and
then stays silent holds the connection forever. Here every connection that is waiting for
request headers (a new connection, or a kept-alive one once the next request starts arriving)
must complete them within ``header_timeout`` seconds, or it is closed. The body has its own
limit (``--body-timeout``, a 408 from the app), and so has the whole request (``--request-timeout``).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """An ``http=`` protocol class for ``uvicorn.Config`` / ``uvicorn.run``."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Waiting for (the rest of) a request's headers: their_state stays IDLE until they end.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm()
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            self._disarm()  # the kept-alive connection is uvicorn's keep-alive timer's now
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection whose request headers did not arrive within %gs",
                                 header_timeout)
                self.transport.close()

    return HeaderTimeoutH11Protocol
