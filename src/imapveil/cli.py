"""`imapveil` on the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from imapveil import __version__, service
from imapveil.config import HELP, ConfigError
from imapveil.config import load as load_settings
from imapveil.policy import PolicyError, apply
from imapveil.policy.load import resolve_policy
from imapveil.protocol import id_params
from imapveil.stats import report as report_module
from imapveil.stats.store import Store, StoreError

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
    check = commands.add_parser(
        "check-config",
        help="check a configuration file (and its policy and key) like `nginx -t`",
        description="Check a configuration file as `serve --config FILE` would, without "
        "listening. Flags override the file as they do for serve. Exit status 0 if valid.",
    )
    check.add_argument("file", metavar="FILE")
    metavars = {"listen": "HOST:PORT", "upstream": "HOST:PORT", "events": "PATH"}
    for command in (serve, check):
        for name, text in HELP.items():
            command.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                metavar=metavars.get(name, name.split("_")[-1].upper()),
                help=text,
            )
    stats = commands.add_parser("stats", help="which clients are in use: a table, CSV or JSON")
    report = commands.add_parser("report", help="a self-contained HTML report with charts")
    for command in (stats, report):
        command.add_argument("--store", help="the statistics store (default: as `serve` uses)")
        command.add_argument("--config", metavar="FILE", help="read `store` from this file")
        command.add_argument("--since", metavar="DATE", help="from this date (YYYY-MM-DD)")
        command.add_argument("--until", metavar="DATE", help="up to this date, exclusive")
        command.add_argument("--min-users", type=int, help="fold smaller groups into 'other'")
    stats.add_argument("--by", choices=sorted(report_module.BY), default="family")
    stats.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.add_argument("--html", metavar="FILE", required=True, help="write the report here")
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
    if args.command in ("stats", "report"):
        return stats_tool(args)
    if args.command not in ("serve", "check-config"):
        parser.print_help()
        return 2
    overrides = {name: getattr(args, name) for name in HELP}
    if args.command == "check-config":
        try:
            loaded = service.check(args.file, overrides)
        except ConfigError as exc:
            print(f"imapveil: {exc}", file=sys.stderr)
            print(f"imapveil: configuration file {args.file} test failed", file=sys.stderr)
            return 1
        s = loaded.settings
        print(f"listen {s.listen}, upstream {s.upstream}, policy {loaded.policy.name}")
        print(f"imapveil: configuration file {args.file} test is successful")
        return 0
    try:
        loaded = service.load_all(args.config, overrides)
    except ConfigError as exc:
        print(f"imapveil: {exc}", file=sys.stderr)
        return 2
    service.setup_logging(loaded.settings.log_level)
    try:
        return trio.run(service.Service(args.config, overrides, loaded).run)
    except KeyboardInterrupt:
        return 130


def stats_tool(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, {"store": args.store}, need_upstream=False)
    except ConfigError as exc:
        print(f"imapveil: {exc}", file=sys.stderr)
        return 2
    url = settings.store_url()
    if url is None:
        print("imapveil: the statistics store is off", file=sys.stderr)
        return 2
    if not url.startswith("postgres") and not Path(url.removeprefix("sqlite://")).exists():
        print(f"imapveil: no statistics store at {url}", file=sys.stderr)
        return 1
    store = Store(url)
    try:
        store.connect()
    except StoreError as exc:
        print(f"imapveil: {exc}", file=sys.stderr)
        return 1
    min_users = args.min_users or settings.min_group_users
    try:
        if args.command == "report":
            page = report_module.html_report(store, args.since, args.until, min_users)
            Path(args.html).write_text(page, encoding="utf-8")
            print(f"wrote {args.html}")
            return 0
        summary = report_module.summarize(store, args.by, args.since, args.until, min_users)
    finally:
        store.close()
    render = {"table": report_module.as_table, "csv": report_module.as_csv,
              "json": report_module.as_json}[args.format]  # fmt: skip
    sys.stdout.write(render(summary, args.by))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
