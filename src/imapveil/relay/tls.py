"""TLS for both legs: contexts from the configuration, and STARTTLS toward the upstream."""

from __future__ import annotations

import logging
import ssl

import trio

from imapveil.protocol.client_leg import Step, UpstreamStartTls, UpstreamTlsError

__all__ = ["UpstreamTlsError", "client_context", "server_context", "upstream_starttls"]

log = logging.getLogger(__name__)


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """For the client leg: the system's defaults, TLS 1.2 at least, our certificate chain, and
    no renegotiation: each is a full handshake's work a client may ask for again and again on
    one connection, where no admission limit sees it (OpenSSL 3 refuses a client's by default,
    OpenSSL 1.1.1 does not)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(cert, key)
    return context


def client_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """For the upstream leg: verification and name checking on unless explicitly turned off.
    A server's renegotiation (TLS 1.2) is carried out (`streams.TlsPath`): a server that asks
    for one takes a refusal as fatal."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def upstream_starttls(
    stream: trio.abc.Stream, context: ssl.SSLContext, server_name: str
) -> tuple[trio.SSLStream[trio.abc.Stream], bytes]:
    """STARTTLS on the upstream before the client sees anything; returns the TLS stream and the
    greeting to show the client, with the capabilities the server announces under TLS.

    The conversation is `protocol.client_leg.UpstreamStartTls` (sans-IO); this drives it."""
    starttls = UpstreamStartTls()
    current: trio.abc.Stream = stream
    tls: trio.SSLStream[trio.abc.Stream] | None = None
    while (step := starttls.next_step()) is not Step.DONE:
        if isinstance(step, bytes):
            await current.send_all(step)
        elif step is Step.RECEIVE:
            starttls.receive(await current.receive_some(16384))
        else:  # Step.HANDSHAKE
            tls = trio.SSLStream(stream, context, server_hostname=server_name)
            await tls.do_handshake()
            current = tls
            starttls.secured()
    assert tls is not None
    return tls, starttls.greeting
