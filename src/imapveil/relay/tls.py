"""TLS for both legs: contexts from the configuration, and STARTTLS toward the upstream."""

from __future__ import annotations

import logging
import ssl

import trio

from imapveil.protocol import lexer

log = logging.getLogger(__name__)

_GREETING_LIMIT = 64 * 1024


class UpstreamTlsError(Exception):
    """The upstream would not (or could not) do TLS. The message says why, briefly."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """For the client leg: the system's defaults, TLS 1.2 at least, our certificate chain."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def client_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """For the upstream leg: verification and name checking on unless explicitly turned off."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _Lines:
    """Reads CRLF lines from a stream, bounded, keeping what comes after."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > _GREETING_LIMIT:
                raise UpstreamTlsError("line too long before TLS")
            chunk = await self.stream.receive_some(16384)
            if not chunk:
                raise UpstreamTlsError("closed before TLS")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"


async def upstream_starttls(
    stream: trio.abc.Stream, context: ssl.SSLContext, server_name: str
) -> tuple[trio.SSLStream[trio.abc.Stream], bytes]:
    """STARTTLS on the upstream before the client sees anything; returns the TLS stream and the
    greeting to show the client, with the capabilities the server announces under TLS."""
    reader = _Lines(stream)
    greeting = await reader.line()
    if not greeting.startswith(b"* OK"):
        raise UpstreamTlsError("no OK greeting")
    await stream.send_all(b"imapveil.0 STARTTLS\r\n")
    while not (answer := await reader.line()).startswith(b"imapveil.0 "):
        pass
    if not answer.startswith(b"imapveil.0 OK"):
        raise UpstreamTlsError("STARTTLS refused")
    if reader.buffer:
        # Bytes after the OK, before the handshake: injected, or a broken server. Never used.
        raise UpstreamTlsError("data after the STARTTLS OK")
    tls = trio.SSLStream(stream, context, server_hostname=server_name)
    await tls.do_handshake()
    await tls.send_all(b"imapveil.1 CAPABILITY\r\n")
    secure = _Lines(tls)
    capabilities = b""
    while not (line := await secure.line()).startswith(b"imapveil.1 "):
        if line[:13].upper() == b"* CAPABILITY ":
            capabilities = lexer.strip_eol(line)[13:]
    body = lexer.strip_eol(greeting)
    _status, code, _args = lexer.status_and_code(body[2:])
    text = body[body.find(b"]") + 1 :].strip() if code else body[4:].strip()
    shown = b"* OK [CAPABILITY " + capabilities + b"] " + text + b"\r\n"
    return tls, shown + secure.buffer  # anything unsolicited after it still reaches the client
