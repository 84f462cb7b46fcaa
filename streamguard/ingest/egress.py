"""An HTTP forward proxy on 127.0.0.1 that enforces the source policy on every request of an HLS stream.

FFmpeg's HLS demuxer opens whatever the playlist names: variant playlists, segments and keys on any host, and it
follows redirects. For a stream added over the API, FFmpeg is given this proxy (its `http_proxy` option, which the
HLS demuxer passes on to every nested request, and which TLS uses for a CONNECT tunnel): each request names its
host, the proxy resolves it, checks every address against the policy (`SourceGuard.resolve`), and connects to a
checked address itself, so what was checked is what is reached (no DNS rebinding between check and connect). A
refused host gets `403 Forbidden`; FFmpeg then fails the request like any other.

Plain HTTP requests arrive in absolute form (`GET http://host/path`) and go on in origin form with `Connection:
close` (FFmpeg is told not to reuse connections, so one client connection carries one request); HTTPS arrives as
`CONNECT host:443` and is tunnelled, end to end encrypted. The proxy runs on its own thread and event loop: segment
bytes never pass through the service's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from urllib.parse import urlsplit

from streamguard.ingest.policy import SourceGuard, SourceRefused

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
CONNECT_TIMEOUT_S = 10.0
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te", b"upgrade"}


class EgressProxy:
    """`start()` returns the proxy's URL (http://127.0.0.1:PORT); `close()` stops it. One per service."""

    def __init__(self, guard: SourceGuard) -> None:
        self.guard = guard
        self.refused = 0  # requests refused by the policy
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=MAX_HEAD_BYTES)
            ready.set()

        def run() -> None:
            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="egress-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def stop() -> None:
            server.close()
            # Connections still piping (a stream closed mid-segment) end here, on their own loop: left pending,
            # they would be closed by the garbage collector after loop.close(), where closing a socket fails.
            piping = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in piping:
                task.cancel()
            await asyncio.gather(*piping, return_exceptions=True)
            await asyncio.sleep(0)  # the transports' connection_lost callbacks
            loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), loop)
        if self._thread is not None:
            self._thread.join(5)

    async def _handle(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(client.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT_S)
            request_line, *headers = head[:-4].split(b"\r\n")
            method, target, version = request_line.decode("latin-1").split(" ", 2)
            tunnel = method.upper() == "CONNECT"
            host, port, path = _destination(target, tunnel)
            upstream = await self._connect(host, port)
        except SourceRefused as exc:
            self.refused += 1
            log.info("egress proxy: refused %s: %s", host, exc)
            await _answer(to_client, b"403 Forbidden", b"refused by the source policy")
            return
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            await _answer(to_client, b"502 Bad Gateway", b"cannot reach the source")
            return
        from_upstream, to_upstream = upstream
        if tunnel:
            to_client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            to_upstream.write(_origin_request(method, path, version, headers))
        await asyncio.gather(_pipe(client, to_upstream), _pipe(from_upstream, to_client))

    async def _connect(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to a checked address of host (SourceRefused when the policy denies one)."""
        addresses = await asyncio.get_running_loop().run_in_executor(None, self.guard.resolve, host, port)
        error: OSError | None = None
        for address in addresses:
            try:
                # asyncio.timeout, not wait_for: the connect is awaited in this task, so a cancellation (the client
                # hung up, shutdown) never leaves an open_connection coroutine created and not awaited.
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    return await asyncio.open_connection(address, port)
            except (OSError, TimeoutError) as exc:
                error = exc if isinstance(exc, OSError) else OSError(str(exc))
        raise error or OSError(f"{host}: no address")


def _destination(target: str, tunnel: bool) -> tuple[str, int, str]:
    """(host, port, origin-form path) of a request target: `host:port` (CONNECT) or an absolute http:// URL."""
    if tunnel:
        host, _, port = target.rpartition(":")
        return host.strip("[]"), int(port), ""
    parts = urlsplit(target)
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ValueError(f"not an absolute http:// URL: {target[:80]!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, path


def _origin_request(method: str, path: str, version: str, headers: list[bytes]) -> bytes:
    kept = [h for h in headers if h.split(b":", 1)[0].strip().lower() not in _HOP_BY_HOP]
    return b"\r\n".join([f"{method} {path} {version}".encode("latin-1"), *kept, b"Connection: close", b"", b""])


async def _answer(writer: asyncio.StreamWriter, status: bytes, body: bytes) -> None:
    with contextlib.suppress(OSError):
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
    writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until the end of the stream, then close the other side (each side closes when its source does)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ConnectionError):
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()
