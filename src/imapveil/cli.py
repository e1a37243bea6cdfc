"""`imapveil` on the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from imapveil import __version__
from imapveil.config import HELP, ConfigError, Settings, load
from imapveil.identity import identifier, load_or_create_key
from imapveil.protocol.session import CoreConfig
from imapveil.relay.connection import RelaySettings
from imapveil.relay.server import Proxy, listener_address, open_listeners
from imapveil.sinks.jsonl import JsonLinesSink

log = logging.getLogger("imapveil")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imapveil",
        description="A transparent IMAP proxy that records which mail clients are in use "
        "without leaking their device identifiers.",
    )
    parser.add_argument("--version", action="version", version=f"imapveil {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="relay IMAP clients to an upstream server",
        description="Relay IMAP clients to an upstream server. Every flag can also be set in "
        "the --config file, as a key with underscores instead of dashes; flags win.",
    )
    serve.add_argument("--config", metavar="FILE", help="a TOML file of settings")
    metavars = {"listen": "HOST:PORT", "upstream": "HOST:PORT", "events": "PATH"}
    for name, text in HELP.items():
        serve.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar=metavars.get(name, name.split("_")[-1].upper()),
            help=text,
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    overrides = {name: getattr(args, name) for name in HELP}
    try:
        settings = load(args.config, overrides)
    except ConfigError as exc:
        print(f"imapveil: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return trio.run(serve, settings)
    except KeyboardInterrupt:
        return 130


async def serve(settings: Settings) -> int:
    assert settings.upstream is not None
    key = None
    if settings.user_identity == "hash":
        try:
            key = load_or_create_key(settings.key_file())
        except (OSError, ValueError) as exc:
            log.error("user key file %s: %s", settings.key_file(), exc)
            return 1
    core = CoreConfig(
        max_line=settings.max_line_length,
        identify_user=identifier(settings.user_identity, key),
        log_commands=settings.log_commands,
        idle_timeout_login=settings.login_timeout,
        idle_timeout=settings.idle_timeout,
    )
    relay = RelaySettings(
        upstream_host=settings.upstream.host,
        upstream_port=settings.upstream.port,
        core=core,
        connect_timeout=settings.connect_timeout,
    )
    sink = JsonLinesSink(settings.events)
    try:
        sink.open()
    except OSError as exc:
        log.error("event log %s: %s", settings.events, exc.strerror or exc)
        return 1
    try:
        listeners = await open_listeners(settings.listen.host, settings.listen.port)
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.listen, exc.strerror or exc)
        return 1
    proxy = Proxy(relay, sink, shutdown_grace=settings.shutdown_grace)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        nursery.start_soon(proxy.stop_on_signals)
        for listener in listeners:
            log.info("listening on %s, relaying to %s", listener_address(listener), relay.upstream)
        await proxy.serve(listeners)
        log.info("stopped after %d sessions", proxy.stats.accepted)
        nursery.cancel_scope.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
