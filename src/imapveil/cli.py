"""`imapveil` on the command line."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence

import trio

from imapveil import __version__
from imapveil.config import HELP, ConfigError, Settings, load
from imapveil.identity import identifier, load_or_create_key
from imapveil.policy import Policy, PolicyError, apply
from imapveil.policy.load import resolve_policy
from imapveil.protocol import id_params
from imapveil.protocol.session import CoreConfig
from imapveil.records import PolicyLoaded
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
    policy = commands.add_parser("policy", help="check and try out ID policy files")
    actions = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate policy files (names or paths)")
    check.add_argument("files", nargs="+", metavar="FILE")
    test = actions.add_parser(
        "test", help="show what a policy forwards and records for one ID command"
    )
    test.add_argument("file", metavar="FILE")
    test.add_argument("id_command", metavar="'ID (...)'", help='e.g. \'ID ("name" "Mail")\'')
    test.add_argument("--trusted", action="store_true", help="as from a trusted network")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "policy":
        return policy_tool(args)
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
        policy = resolve_policy(settings.policy)
    except PolicyError as exc:
        print(f"imapveil: policy: {exc}", file=sys.stderr)
        return 2
    try:
        return trio.run(serve, settings, policy)
    except KeyboardInterrupt:
        return 130


def policy_tool(args: argparse.Namespace) -> int:
    if args.policy_command == "check":
        status = 0
        for spec in args.files:
            try:
                policy = resolve_policy(spec)
            except PolicyError as exc:
                print(exc, file=sys.stderr)
                status = 1
            else:
                rules = len(policy.rules)
                print(f"{spec}: ok ({policy.name}, {rules} rules, sha256 {policy.digest[:12]})")
        return status
    try:
        policy = resolve_policy(args.file)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    text = args.id_command.encode("utf-8")
    verb, _, rest = text.strip().partition(b" ")
    if verb.upper() != b"ID":
        rest = text  # the list alone
    try:
        fields = id_params.parse(rest)
    except id_params.IdSyntaxError as exc:
        print(f"not an ID list the proxy would rewrite (it would be forwarded unchanged): {exc}")
        return 1
    outcome = apply(policy, fields, hasher=lambda _v: "hmac:<keyed>", trusted_client=args.trusted)
    forwarded = id_params.serialize(outcome.forwarded, literal_plus=True)
    print(f"policy:    {policy.name} (sha256 {policy.digest[:12]})")
    print(f"forwarded: ID {forwarded.decode('utf-8', 'backslashreplace')}")
    print(f"recorded:  {json.dumps(outcome.recorded, ensure_ascii=False)}")
    print("decisions:")
    for d in outcome.decisions:
        print(f"  {d.field:<32} forward={d.forward:<9} record={d.record:<8} by {d.rule}")
    return 0


class PolicyHolder:
    """The ID policy in force; SIGHUP replaces it for ID commands that come afterwards."""

    def __init__(self, spec: str, policy: Policy, sink: JsonLinesSink) -> None:
        self.spec = spec
        self.current = policy
        self.sink = sink

    def __call__(self) -> Policy:
        return self.current

    def reload(self) -> None:
        try:
            policy = resolve_policy(self.spec)
        except PolicyError as exc:
            log.error("policy not reloaded, keeping %s: %s", self.current.name, exc)
            self.sink.emit(PolicyLoaded(self.current.name, self.current.digest, False, str(exc)))
            return
        self.current = policy
        log.info("policy %s reloaded (sha256 %s)", policy.name, policy.digest[:12])
        self.sink.emit(PolicyLoaded(policy.name, policy.digest, True))

    async def reload_on_sighup(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                self.reload()


def _value_hasher(key: bytes) -> Callable[[bytes], str]:
    def hash_value(value: bytes) -> str:
        return "hmac:" + hmac.new(key, b"id\0" + value, hashlib.sha256).hexdigest()[:32]

    return hash_value


async def serve(settings: Settings, policy: Policy) -> int:
    assert settings.upstream is not None
    try:
        key = load_or_create_key(settings.key_file())
    except (OSError, ValueError) as exc:
        log.error("user key file %s: %s", settings.key_file(), exc)
        return 1
    sink = JsonLinesSink(settings.events)
    holder = PolicyHolder(settings.policy, policy, sink)
    core = CoreConfig(
        max_line=settings.max_line_length,
        identify_user=identifier(settings.user_identity, key),
        log_commands=settings.log_commands,
        idle_timeout_login=settings.login_timeout,
        idle_timeout=settings.idle_timeout,
        policy=holder,
        hash_value=_value_hasher(key),
        inject_id=tuple((k.encode(), v.encode()) for k, v in settings.inject_id),
    )
    relay = RelaySettings(
        upstream_host=settings.upstream.host,
        upstream_port=settings.upstream.port,
        core=core,
        connect_timeout=settings.connect_timeout,
        trusted_networks=tuple(
            ipaddress.ip_network(n, strict=False) for n in settings.trusted_networks
        ),
    )
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
        nursery.start_soon(holder.reload_on_sighup)
        sink.emit(PolicyLoaded(policy.name, policy.digest, True))
        for listener in listeners:
            log.info("listening on %s, relaying to %s", listener_address(listener), relay.upstream)
        await proxy.serve(listeners)
        log.info("stopped after %d sessions", proxy.stats.accepted)
        nursery.cancel_scope.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
