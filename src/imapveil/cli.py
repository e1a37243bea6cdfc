"""`imapveil` on the command line.

Exit status (the same for every command; `EXIT_STATUS` is what --help and the man page say):
0 done; 1 the configuration (or a policy file) is invalid, or the work could not be done; 2 the
command line is wrong; 130 interrupted. Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import io
import logging
import re
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from imapveil import __version__, checks
from imapveil.config import BY_NAME, DECLARATIONS, ConfigError, Declaration
from imapveil.config import load as load_settings
from imapveil.config_files import check_files, statistics_stores
from imapveil.policy import PolicyError, apply
from imapveil.policy.load import resolve_policy
from imapveil.protocol import id_params
from imapveil.stats import currency, inventory, tables, traits
from imapveil.stats import report as report_module
from imapveil.stats.charts import safe, safe_json
from imapveil.stats.labels import LabelError, load_labels
from imapveil.stats.store import Store, StoreError

log = logging.getLogger("imapveil")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_CONFIG = EXIT_FAILURE
"""A configuration error: the same status from `serve` and `check-config` (and from `stats` and
`report` reading a configuration file)."""
EXIT_STATUS = (
    ("0", "done (check-config: the configuration is valid)"),
    ("1", "the configuration or a policy file is invalid (serve, check-config, stats and report "
          "with --config, policy), or the work could not be done: cannot listen, the statistics "
          "store is missing or unreachable, the report cannot be written"),
    ("2", "the command line is wrong: an unknown command or flag, a bad flag value, a bad date"),
    ("130", "interrupted (Ctrl-C)"),
)  # fmt: skip


class Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr (and exit status 2), not the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def plain(text: str) -> str:
    """Help text for a terminal: `code` without its backticks."""
    return text.replace("`", "")


def default_text(d: Declaration) -> str:
    """The default as people read it (README, --help, example file, man page)."""
    if d.default:
        return d.default
    value = d.value
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if value in ((), ""):
        return "none"
    return f"`{value}`"


def flag(d: Declaration) -> str:
    return "--" + d.name.replace("_", "-")


def _checked(d: Declaration) -> Callable[[str], str]:
    """A flag's value checked as the configuration file's would be; kept as text for the loader."""

    def check(text: str) -> str:
        try:
            d.convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    check.__name__ = d.name
    return check


def add_setting_flags(command: argparse.ArgumentParser) -> None:
    group = command.add_argument_group(
        "settings", "each also a key of the configuration file (underscores for dashes); "
        "flags win over the file"
    )  # fmt: skip
    for d in DECLARATIONS:
        text = f"{plain(d.help)} (default: {plain(default_text(d))})".replace("%", "%%")
        if d.metavar is None:
            group.add_argument(
                flag(d), dest=d.name, action=argparse.BooleanOptionalAction, default=None,
                help=text,
            )  # fmt: skip
        else:
            group.add_argument(flag(d), dest=d.name, metavar=d.metavar, type=_checked(d), help=text)


BOOLEAN_FLAGS = {flag(d): d for d in DECLARATIONS if d.metavar is None}


def legacy_booleans(argv: Sequence[str]) -> list[str]:
    """`--compress true` / `--compress=false`, as earlier versions took them, as `--compress` /
    `--no-compress`."""
    out: list[str] = []
    words = list(argv)
    while words:
        word = words.pop(0)
        name, eq, value = word.partition("=")
        if not eq and name in BOOLEAN_FLAGS and words and words[0].lower() in ("true", "false"):
            value = words.pop(0)
        elif not (eq and name in BOOLEAN_FLAGS and value.lower() in ("true", "false")):
            out.append(word)
            continue
        out.append(name if value.lower() == "true" else "--no-" + name[2:])
    return out


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def when(text: str) -> str:
    """`--since`/`--until`: a date (YYYY-MM-DD, UTC) or an ISO 8601 time, as the store writes
    times (UTC, milliseconds), so that they compare as text."""
    try:
        if _DAY.fullmatch(text):
            return datetime.date.fromisoformat(text).isoformat()
        if not _DAY.match(text):
            raise ValueError("expected YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM]")
        moment = datetime.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date or time: {exc}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds")


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, at least 0")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="imapveil",
        description="A transparent IMAP proxy that records which mail clients are in use "
        "without leaking their device identifiers.",
        epilog="exit status: "
        + "; ".join(f"{code}: {text}" for code, text in EXIT_STATUS)
        + ". Every error is one line on stderr.",
    )
    parser.add_argument("--version", action="version", version=f"imapveil {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="relay IMAP clients to an upstream server",
        description="Relay IMAP clients to an upstream server. Every flag can also be set in "
        "the --config file, as a key with underscores instead of dashes; flags win. An invalid "
        "configuration exits with status 1 before anything listens.",
    )
    serve.add_argument("--config", metavar="FILE", help="a TOML file of settings")
    check = commands.add_parser(
        "check-config",
        help="check a configuration file (and its policy, key and certificates) like `nginx -t`",
        description="Check a configuration file as `serve --config FILE` would, without "
        "listening and without the network (the unit runs it before every start). Flags "
        "override the file as they do for serve. Exit status 0 if valid, 1 if not.",
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument(
        "--online", action="store_true",
        help="also resolve the upstream and open the statistics store, and say what was checked",
    )  # fmt: skip
    for command in (serve, check):
        add_setting_flags(command)
    stats = commands.add_parser(
        "stats",
        help="which clients are in use: a table, CSV or JSON",
        description="Sessions, distinct users, first and last seen per client family, version, "
        "operating system or day, from the statistics store the service writes.",
    )
    report = commands.add_parser(
        "report",
        help="a self-contained HTML report with charts, and every table of it as CSV and JSON",
        description="One self-contained HTML page with charts (inline SVG) and tables of the "
        "statistics (--html), and every one of its tables as CSV and JSON files (--export): "
        "the same rows, k-floored the same way.",
    )
    for command in (stats, report):
        command.add_argument(
            "--store", metavar="FILE|URL", type=_checked(BY_NAME["store"]),
            help="the statistics store (default: the configuration's `store`, found as `serve` "
            "finds it; without one, /var/lib/imapveil/stats.sqlite, the shipped unit's, or "
            "~/.local/state/imapveil/stats.sqlite, whichever exists, root's choice first)",
        )  # fmt: skip
        command.add_argument(
            "--config", metavar="FILE",
            help="read `store`, `user_key_file` and `min_group_users` from the service's "
            "configuration file (e.g. /etc/imapveil/imapveil.toml)",
        )  # fmt: skip
        command.add_argument(
            "--since", metavar="DATE", type=when,
            help="from this date (YYYY-MM-DD, UTC) or time (ISO 8601)",
        )  # fmt: skip
        command.add_argument(
            "--until", metavar="DATE", type=when, help="up to this date or time, exclusive"
        )
        command.add_argument(
            "--min-users", metavar="N", type=count,
            help="fold groups of fewer distinct users into 'other'; 0 folds none (default: "
            "the configuration's min_group_users, 5)",
        )  # fmt: skip
    stats.add_argument(
        "--by", choices=sorted([*report_module.BY, *TRAITS_BY, "currency", "week"]),
        default="family",
        help="currency: per family, users on a current, an outdated or an unsupported version "
        "(by clients.toml), each by their most recent session; week: distinct users per family "
        "and ISO week, and the families that appeared or disappeared in the last week; "
        "extension: per family, the IMAP extensions its users used; fingerprint: the TLS (JA4) "
        "and behaviour fingerprints seen, each with the families named in an ID beside it and "
        "its label (`fingerprint_labels`); family: with the users of labelled fingerprints "
        "that sent no ID apart, as inferred",
    )  # fmt: skip
    stats.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.add_argument("--html", metavar="FILE", help="write the report here ('-': stdout)")
    report.add_argument(
        "--export", metavar="DIR",
        help="write each table of the report as DIR/<table>.csv and DIR/<table>.json (made if "
        f"missing): {', '.join(report_module.TABLES)}",
    )  # fmt: skip
    policy = commands.add_parser("policy", help="check and try out ID policy files")
    actions = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate policy files (names or paths)")
    check.add_argument("files", nargs="+", metavar="FILE")
    test = actions.add_parser(
        "test", help="show what a policy forwards and records for one ID command"
    )
    test.add_argument("file", metavar="FILE")
    test.add_argument(
        "id_command", metavar="'ID (...)'",
        help='e.g. \'ID ("name" "Mail")\'; a tag before ID, as a client sent the command, and '
        "the list alone are taken too",
    )  # fmt: skip
    test.add_argument("--trusted", action="store_true", help="as from a trusted network")
    return parser


TRAITS_BY = ("extension", "fingerprint")


def fail(message: str, status: int = EXIT_FAILURE) -> int:
    print(f"imapveil: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # A terminal that is not UTF-8 (a Latin-1 or ASCII locale): what it cannot show, a
        # client's `Почта` or our own `…`, is written as an escape, not a traceback.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(legacy_booleans(sys.argv[1:] if argv is None else argv))
    if args.command == "policy":
        return policy_tool(args)
    if args.command == "report" and not (args.html or args.export):
        parser.error("report needs --html FILE, --export DIR or both")
    if args.command in ("stats", "report"):
        return stats_tool(args)
    if args.command not in ("serve", "check-config"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    overrides = {d.name: getattr(args, d.name) for d in DECLARATIONS}
    if args.command == "check-config":
        return check_config(args.file, overrides, online=args.online)
    # The relay (trio, the core, the metrics) is imported for the commands that run it only:
    # `stats` and `report` start in half the time without it.
    import trio  # noqa: PLC0415

    from imapveil import service  # noqa: PLC0415

    try:
        check_files(load_settings(args.config, overrides))
        loaded = service.load_all(args.config, overrides)
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    service.setup_logging(loaded.settings.log_level)
    try:
        return trio.run(service.Service(args.config, overrides, loaded).run)
    except KeyboardInterrupt:
        return 130
    finally:
        service.settle_logging()


def check_config(file: str, overrides: dict[str, Any], *, online: bool) -> int:
    from imapveil import service  # noqa: PLC0415 (the relay's modules: see serve)

    try:
        check_files(load_settings(file, overrides))
        loaded = service.check(file, overrides)
        checked = checks.online(loaded.settings) if online else []
    except ConfigError as exc:
        return fail(f"configuration file {file} test failed: {exc}", EXIT_CONFIG)
    s = loaded.settings
    print(f"listen {s.listen}, upstream {s.upstream}, policy {loaded.policy.name}")
    for line in checked:
        print(line)
    if not online:
        print("(offline: the upstream's name and the store were not tried; --online does)")
    print(f"imapveil: configuration file {file} test is successful")
    return EXIT_OK


def _store_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (StoreError, sqlite3.Error, OSError)
    try:
        import psycopg  # noqa: PLC0415 (only fleets have it)
    except ImportError:
        return errors
    return (*errors, psycopg.Error)


def find_store(settings_store: list[str]) -> str | None:
    for url in settings_store:
        if url.startswith(("postgresql://", "postgres://")):
            return url
        try:
            if Path(url.removeprefix("sqlite://")).is_file():
                return url
        except OSError:  # a directory we may not look into
            continue
    return None


def stats_tool(args: argparse.Namespace) -> int:
    if args.since and args.until and args.since >= args.until:
        return fail(f"{args.command}: --since {args.since} is not before --until {args.until}", 2)
    try:
        settings = load_settings(args.config, {"store": args.store}, need_upstream=False)
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    candidates = statistics_stores(settings)
    if not candidates:
        return fail('the statistics store is off (store = "off")')
    url = find_store(candidates)
    if url is None:
        return fail(f"no statistics store at {' nor at '.join(candidates)}")
    min_users = settings.min_group_users if args.min_users is None else args.min_users
    store = Store(url)
    try:
        store.connect()
        if args.command == "report":
            labels = load_labels(settings.fingerprint_labels)
            made = report_module.build(store, args.since, args.until, min_users, labels=labels)
        elif args.by == "currency":
            rows = currency.currency_rows(store, args.since, args.until, min_users)
        else:
            text = stats_text(store, args, min_users, settings.fingerprint_labels)
    except (currency.CurrencyError, LabelError) as exc:
        return fail(str(exc), EXIT_CONFIG)
    except _store_errors() as exc:
        return fail(f"statistics store {checks.redact(url)}: {checks.one_line(exc)}")
    finally:
        store.close()
    if args.command == "report":
        return write_report(args.html, args.export, made)
    if args.by == "currency":
        sys.stdout.write(currency.RENDER[args.format](rows))
        return EXIT_OK
    sys.stdout.write(text)
    return EXIT_OK


def stats_text(store: Store, args: argparse.Namespace, min_users: int, own_labels: str) -> str:
    """`imapveil stats --by BY --format FORMAT` but currency: every group k-floored. Raises
    LabelError for a bad labels file (`own_labels`, the `fingerprint_labels` setting)."""
    labels = load_labels(own_labels) if args.by in ("family", "fingerprint") else {}
    period = {"since": args.since, "until": args.until, "min_users": min_users}
    if args.by == "extension":
        return traits.RENDER_EXTENSIONS[args.format](traits.extension_usage(store, **period))
    if args.by == "fingerprint":
        usage = traits.fingerprint_usage(store, **period, labels=labels)
        return traits.RENDER_FINGERPRINTS[args.format](usage)
    text = report_module.export(store, args.by, args.format, **period)
    if args.by == "family":
        text = traits.with_inferred(
            text, args.format, inventory.inferred(store, **period, labels=labels)
        )
    return text


def write_report(target: str | None, directory: str | None, made: report_module.Report) -> int:
    if directory:
        try:
            written = tables.export(list(made.tables.values()), Path(directory))
        except OSError as exc:
            return fail(f"cannot export the tables to {directory}: {exc.strerror or exc}")
        said = f"wrote {len(written)} files ({len(made.tables)} tables) to {directory}"
        print(said, file=sys.stderr if target == "-" else sys.stdout)  # not into the page
    if not target:
        return EXIT_OK
    page = report_module.render(made)
    if target == "-":
        # In UTF-8, as the page says it is (`<meta charset="utf-8">`), whatever the terminal's
        # encoding: the page is for a file or a browser.
        out = sys.stdout
        if isinstance(out, io.TextIOWrapper):
            out.flush()
            out.buffer.write(page.encode("utf-8"))
            out.buffer.flush()
        else:
            out.write(page)
        return EXIT_OK
    try:
        Path(target).write_text(page, encoding="utf-8")
    except OSError as exc:
        return fail(f"cannot write the report to {target}: {exc.strerror or exc}")
    print(f"wrote {target}")
    return EXIT_OK


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
    # The octets as they came: a command captured from a client need not be UTF-8, and Python
    # gives what is not as lone surrogates (PEP 383).
    text = args.id_command.encode("utf-8", "surrogateescape")
    line = text.strip()
    words = line.split(b" ", 2)
    if words[0].upper() == b"ID":
        rest = line.partition(b" ")[2]
    elif len(words) > 2 and words[1].upper() == b"ID":
        rest = words[2]  # a tag first: the command line as a client sends it
    else:
        rest = line  # the list alone
    try:
        fields = id_params.parse(rest)
    except id_params.IdSyntaxError as exc:
        print(f"not an ID list the proxy would rewrite (it would be forwarded unchanged): {exc}")
        return 1
    outcome = apply(
        policy, fields, hasher=lambda _v: "hmac:<keyed>", trusted_client=args.trusted, explain=True
    )
    forwarded = id_params.serialize(outcome.forwarded, literal_plus=True)
    # What a client sent, shown as `imapveil stats` shows it: the command may be an attacker's,
    # its escape sequences, bidirectional overrides and invisible characters escaped, and a
    # literal's CR LF too (one line each).
    print(f"policy:    {policy.name} (sha256 {policy.digest[:12]})")
    print(f"forwarded: ID {safe(forwarded.decode('utf-8', 'backslashreplace'))}")
    print(f"recorded:  {safe_json(outcome.recorded)}")
    print("decisions:")
    for d in outcome.decisions:
        print(f"  {d.field:<32} forward={d.forward:<9} record={d.record:<8} by {d.rule}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
