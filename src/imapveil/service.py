"""The running service: settings, policy, listeners, proxy, event log, signals, systemd.

Lifecycle (as an administrator expects from nginx or Dovecot):
- start: the configuration and policy are checked before anything listens; READY=1 is sent to
  systemd once the listeners are open.
- SIGHUP: the configuration file and the policy are read again and apply to new connections and
  new ID commands; open sessions go on. An invalid file is refused (logged, and a record), and the
  old configuration stays. The event log file is reopened, for log rotation.
- SIGTERM/SIGINT: listeners close, sessions get `shutdown_grace` seconds to finish, then each
  gets `* BYE [UNAVAILABLE]` and is closed; every record is written before the process exits 0.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import resource
import signal
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from imapveil import logs
from imapveil.config import ConfigError, Settings, load, parse_endpoint
from imapveil.config_files import check_files
from imapveil.identity import identifier, load_or_create_key
from imapveil.policy import Policy, PolicyError
from imapveil.policy.load import resolve_policy
from imapveil.protocol.session import CoreConfig
from imapveil.records import ConfigLoaded, PolicyLoaded, StoreDropped
from imapveil.relay import tls
from imapveil.relay.connection import RelaySettings
from imapveil.relay.limits import Limits
from imapveil.relay.server import Admittance, Proxy, listener_address, open_listeners
from imapveil.relay.streams import Networks, resolve
from imapveil.shown import shown
from imapveil.sinks import Fanout, Sink, TimedSink
from imapveil.sinks.jsonl import JsonLinesSink
from imapveil.stats.metrics import Metrics, serve_metrics
from imapveil.stats.sink import StoreSink
from imapveil.stats.spool import spool_directory
from imapveil.systemd import Notifier, inherited_sockets

log = logging.getLogger("imapveil")


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    policy: Policy
    key: bytes
    client_context: ssl.SSLContext | None = None
    upstream_context: ssl.SSLContext | None = None


def setup_logging(level: str) -> None:
    """Diagnostics on stderr as `serve` writes them: journald's priorities under systemd; written
    at once until `Service.run` starts, then by a writer thread (see `logs`)."""
    logs.setup(level)


def settle_logging() -> None:
    """At exit: stderr gets up to `logs.FLUSH_WITHIN` seconds to take the lines held."""
    stderr = logs.installed()
    if stderr is not None:
        stderr.stop()


def load_all(config: str | None, overrides: Mapping[str, Any]) -> Loaded:
    """Everything a start or a reload needs, checked; raises ConfigError with a clear message.

    A reload gets the same file checks as a start (directories of the files it writes, the
    certificate and key), so that a bad path is refused, not found at the first session."""
    settings = load(config, overrides)
    check_files(settings)
    try:
        policy = resolve_policy(settings.policy)
    except PolicyError as exc:
        raise ConfigError(f"policy: {exc}") from None
    try:
        key = load_or_create_key(settings.key_file())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"user_key_file {shown(str(settings.key_file()))}: {exc}") from None
    client_context = upstream_context = None
    if settings.cert and settings.key:
        try:
            client_context = tls.server_context(settings.cert, settings.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cert/key {shown(settings.cert)}, {shown(settings.key)}: {exc}"
            ) from None
    if settings.upstream_tls != "plain":
        try:
            upstream_context = tls.client_context(settings.upstream_ca, settings.upstream_verify)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"upstream_ca {shown(settings.upstream_ca)}: {exc}") from None
    return Loaded(settings, policy, key, client_context, upstream_context)


class PolicyHolder:
    """The ID policy in force; a reload replaces it for ID commands that come afterwards."""

    def __init__(self, policy: Policy) -> None:
        self.current = policy

    def __call__(self) -> Policy:
        return self.current


def value_hasher(key: bytes) -> Callable[[bytes], str]:
    def hash_value(value: bytes) -> str:
        return "hmac:" + hmac.new(key, b"id\0" + value, hashlib.sha256).hexdigest()[:32]

    return hash_value


def admittance(loaded: Loaded, holder: PolicyHolder) -> Admittance:
    s = loaded.settings
    assert s.upstream is not None
    core = CoreConfig(
        max_line=s.max_line_length,
        identify_user=identifier(s.user_identity, loaded.key),
        log_commands=s.log_commands,
        idle_timeout_login=s.login_timeout,
        login_deadline=s.login_deadline,
        idle_timeout=s.idle_timeout,
        policy=holder,
        hash_value=value_hasher(loaded.key),
        inject_id=tuple((k.encode(), v.encode()) for k, v in s.inject_id),
        forward_client_address=s.forward_client_address,
        client_tls=s.client_tls,
        compress=s.compress,
        strict_capabilities=s.capabilities == "strict",
        greeting_timeout=s.connect_timeout,
    )
    try:
        addresses = resolve(s.upstream.host, s.upstream.port)
    except OSError as exc:
        # Not fatal: the name may resolve later; then each connection looks it up.
        log.warning(
            "upstream %s does not resolve now (%s); will try per connection", s.upstream, exc
        )
        addresses = ()
    relay = RelaySettings(
        upstream_host=s.upstream.host,
        upstream_port=s.upstream.port,
        upstream_addresses=addresses,
        core=core,
        connect_timeout=s.connect_timeout,
        tls_handshake_timeout=s.tls_handshake_timeout,
        trusted_networks=_networks(s.trusted_networks),
        upstream_proxy_protocol=s.upstream_proxy_protocol,
        client_context=loaded.client_context,
        upstream_tls=s.upstream_tls,
        upstream_context=loaded.upstream_context,
    )
    limits = Limits(
        s.max_sessions,
        s.max_sessions_per_client,
        s.max_connection_rate,
        exempt=_networks(s.limits_exempt),
        ipv6_prefix=s.ipv6_prefix,
    )
    return Admittance(relay, limits, _networks(s.proxy_protocol_from))


def _networks(texts: tuple[str, ...]) -> Networks:
    return tuple(ipaddress.ip_network(n, strict=False) for n in texts)


class Service:
    def __init__(self, config: str | None, overrides: Mapping[str, Any], loaded: Loaded) -> None:
        self.config = config
        self.overrides = dict(overrides)
        self.loaded = loaded
        self.holder = PolicyHolder(loaded.policy)
        self.sink = JsonLinesSink(loaded.settings.events)
        self.metrics = Metrics()
        settings = loaded.settings
        url = settings.store_url()
        self.store = (
            StoreSink(
                url,
                proxy=settings.proxy(),
                retention_days=settings.retention_days,
                spool=spool_directory(settings.key_file().parent, settings.proxy()),
            )
            if url
            else None
        )
        sinks: list[TimedSink] = [self.sink, self.metrics]
        if self.store is not None:
            sinks.append(self.store)
        self.fanout = Fanout(*sinks)
        self.metrics.refresh = self.fanout.deliver  # a scrape sees every record made before it
        self.notifier = Notifier()
        self._reload_wanted = False  # a reload is running
        self._reload_again = False  # a SIGHUP came during it
        self._reload_scope: trio.CancelScope | None = None  # what a stop cancels
        self.proxy = Proxy(
            admittance(loaded, self.holder),
            self.fanout,
            shutdown_grace=loaded.settings.shutdown_grace,
        )
        stats = self.proxy.stats
        self.metrics.gauge("sessions_active", "Sessions open now", lambda: stats.active)
        self.metrics.counter(
            "events_dropped",
            "Records the event log lost (its queue was full, or its writes failed)",
            lambda: self.sink.dropped,
        )  # fmt: skip
        self.metrics.counter(
            "connections_refused", "Connections refused over a limit", lambda: stats.refused
        )
        stderr = self._stderr = logs.installed()  # `setup_logging` came first; None in tests
        self.metrics.counter(
            "diagnostics_dropped",
            "Diagnostic lines lost: stderr (the journal) took nothing and the buffer was full",
            lambda: stderr.dropped if stderr is not None else 0,
        )
        if self.store is not None:
            self.metrics.watch_store(self.store)

    async def run(self) -> int:
        # From here on no diagnostic line is written from the event loop (logs.StderrHandler);
        # `serve` gives stderr a bounded time to take what is held once the loop has returned.
        if self._stderr is not None:
            self._stderr.start()
        try:
            return await self._run()
        finally:
            self.notifier.close()

    async def _run(self) -> int:
        settings = self.loaded.settings
        descriptors(settings.max_sessions)
        try:
            self.sink.open()
        except OSError as exc:
            log.error("event log %s: %s", settings.events, exc.strerror or exc)
            return 1
        if settings.upstream_tls != "plain" and not settings.upstream_verify:
            log.warning("upstream_verify = false: the upstream's certificate is NOT checked")
        try:
            listeners, tls_listeners = await self._listeners()
        except (OSError, ConfigError) as exc:
            log.error(
                "cannot listen on %s: %s", settings.listen, getattr(exc, "strerror", exc) or exc
            )
            return 1
        metrics_listeners: list[trio.SocketListener] = []
        if settings.metrics:
            endpoint = parse_endpoint(settings.metrics)
            try:
                metrics_listeners = await open_listeners(endpoint.host, endpoint.port)
            except OSError as exc:
                log.error("cannot serve metrics on %s: %s", endpoint, exc.strerror or exc)
                return 1
        async with trio.open_nursery() as events:
            events.start_soon(self.sink.run)
            try:
                await self._serve(listeners, tls_listeners, metrics_listeners)
            finally:
                # The service failing (a bug in one of its tasks), its sessions cut off: what
                # they said last is in the Fanout still, and goes to the event log, written last.
                self.fanout.deliver()
            if self.store is not None:
                report_store_drops(self.store, self.sink, final=True)
            # The event log goes last: every record of every session is written before exit.
            events.cancel_scope.cancel()
        self.notifier.close()
        return 0

    async def _serve(
        self,
        listeners: list[trio.SocketListener],
        tls_listeners: list[trio.SocketListener],
        metrics_listeners: list[trio.SocketListener],
    ) -> None:
        """Serve until stopped; return once the store's writer has finished."""
        async with trio.open_nursery() as nursery, trio.open_nursery() as writers:
            nursery.start_soon(self.fanout.run)
            if self.store is not None:
                writers.start_soon(self.store.run)
                nursery.start_soon(self._report_store_drops, self.store)
            if metrics_listeners:
                nursery.start_soon(serve_metrics, self.metrics, metrics_listeners, self._health)
            # Signals are handled before anyone is told we are ready: a reload right after
            # READY=1 must not find the default SIGHUP action (which ends the process).
            await nursery.start(self._on_signals)
            if self.notifier.enabled:  # what its socket could not take at once, later
                nursery.start_soon(self.notifier.run)
            if self.notifier.watchdog_interval:
                nursery.start_soon(self._watchdog, self.notifier.watchdog_interval)
            self.fanout.emit(ConfigLoaded(self.config or "command line", True))
            policy = self.loaded.policy
            self.fanout.emit(PolicyLoaded(policy.name, policy.digest, True))
            upstream = self.proxy.settings.upstream
            where = ", ".join(
                [listener_address(x) for x in listeners]
                + [listener_address(x) + " (TLS)" for x in tls_listeners]
            )
            log.info("listening on %s, relaying to %s, policy %s", where, upstream, policy.name)
            self.notifier.ready(f"relaying {where} to {upstream}")
            await self.proxy.serve(listeners, tls_listeners=tls_listeners)
            log.info("stopped after %d sessions", self.proxy.stats.accepted)
            self.fanout.deliver()  # every session's records, before the writers finish
            nursery.cancel_scope.cancel()
            # The store's writer first: it drains its queue to the store or the spool.
            writers.cancel_scope.cancel()

    async def _listeners(self) -> tuple[list[trio.SocketListener], list[trio.SocketListener]]:
        """(plain, implicit TLS): inherited from systemd ("imap", "imaps"), or bound here."""
        settings = self.loaded.settings
        inherited = inherited_sockets()
        if not inherited:
            plain = await open_listeners(settings.listen.host, settings.listen.port)
            secure: list[trio.SocketListener] = []
            for endpoint in settings.listen_tls:
                secure += await open_listeners(endpoint.host, endpoint.port)
            return plain, secure
        plain, secure = [], []
        for name, sock in inherited:
            if name not in ("imap", "imaps"):
                raise ConfigError(f"socket-activated listener {name!r}: expected imap or imaps")
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                # A UNIX socket has no client address: no record could name the client, no
                # limit count it, and `proxy_protocol_from` (networks) never trust its header.
                raise ConfigError(f"socket-activated listener {name!r}: not a TCP socket")
            if name == "imaps" and self.loaded.client_context is None:
                raise ConfigError("an imaps socket was handed over but no cert/key is set")
            sock.setblocking(False)
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            (secure if name == "imaps" else plain).append(listener)
            log.info("using the %s socket handed over by systemd", name)
        return plain, secure

    async def _on_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # What trio restores when its receiver closes, and where it redelivers a signal that
        # arrived but was not read: from then on the service is writing its last records (the
        # store's queue, the event log), and a further SIGTERM (a repeated `systemctl stop`)
        # or SIGHUP (a log rotation's reload) must not cut that short, as the default action
        # would. Ignored, not a handler of Python's: the interpreter, as it exits, puts the
        # default action back in place of its own handlers.
        for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(stop, signal.SIG_IGN)
        # Reloads run beside this loop, one at a time: a stop must be read while a reload
        # waits on a hung mount or a resolver, and it abandons that reload.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                task_status.started()
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        if self._reload_wanted:  # one is running: one more after it, no more
                            if not self._reload_again:
                                log.info("SIGHUP during a reload: reloading again after it")
                            self._reload_again = True
                        else:
                            self._reload_wanted = True
                            nursery.start_soon(self._reloads)
                        continue
                    name = signal.Signals(signum).name
                    if self.proxy.stopping.is_set():
                        log.info("received %s again: sessions get BYE now", name)
                        self.proxy.shutdown.set()
                        continue
                    grace = self.proxy.shutdown_grace
                    if self._reload_scope is not None:
                        log.warning("received %s during a reload: the reload is abandoned", name)
                        self._reload_scope.cancel()
                    log.info("received %s, shutting down (sessions get %g s)", name, grace)
                    self.notifier.stopping()
                    self.proxy.stop()

    async def _reloads(self) -> None:
        """Reload until no SIGHUP came during the last reload."""
        try:
            while True:
                self._reload_again = False
                with trio.CancelScope() as scope:
                    self._reload_scope = scope
                    await self.reload()
                self._reload_scope = None
                if scope.cancelled_caught or not self._reload_again:  # abandoned by a stop
                    return
        finally:
            self._reload_wanted = False
            self._reload_scope = None

    def _load(self) -> tuple[Loaded, Admittance]:
        """The configuration as the files say now, and what new connections get from it (the
        upstream's addresses looked up again). Blocking: for a worker thread."""
        loaded = load_all(self.config, self.overrides)
        return loaded, admittance(loaded, self.holder)

    async def reload(self) -> None:
        # Once stopping (a rotation's SIGHUP in the grace period, or one read with the SIGTERM
        # before its reload began), the reload still reopens the event log, but systemd, told
        # STOPPING=1, is told nothing more: no RELOADING=1 without its READY=1.
        if not self.proxy.stopping.is_set():
            self.notifier.reloading()
        try:
            source = self.config or "command line"
            try:
                # In a worker thread: reading the files (a hung mount) and looking the upstream
                # up again (a resolver that answers late) must not hold up the sessions.
                # Abandoned (the thread left to finish on its own) if the service stops.
                loaded, admitted = await trio.to_thread.run_sync(self._load, abandon_on_cancel=True)
            except Exception as exc:
                if not isinstance(
                    exc, ConfigError
                ):  # a check missing (a bug): refused all the same
                    log.exception("reload failed")
                    exc = ConfigError(f"reload failed: {type(exc).__name__}")
                log.error("reload refused, the running configuration stays: %s", exc)
                self.fanout.emit(ConfigLoaded(source, False, str(exc)))
                self.fanout.emit(
                    PolicyLoaded(
                        self.holder.current.name, self.holder.current.digest, False, str(exc)
                    )
                )
                return
            old = self.loaded.settings
            if loaded.settings.listen != old.listen:
                log.warning("listen changed to %s: restart to apply", loaded.settings.listen)
            if loaded.settings.proxy() != old.proxy() and self.store is not None:
                log.warning("proxy_name changed to %s: restart to apply", loaded.settings.proxy())
            new = loaded.settings
            for name, changed in (
                ("listen_tls", new.listen_tls != old.listen_tls),
                ("metrics", new.metrics != old.metrics),
                ("store", new.store_url() != old.store_url()),  # not shown: it may hold a password
                ("retention_days", new.retention_days != old.retention_days and self.store),
            ):
                if changed:
                    log.warning("%s changed: restart to apply", name)
            self.loaded = loaded
            self.holder.current = loaded.policy
            self.proxy.reconfigure(admitted)
            self.proxy.shutdown_grace = loaded.settings.shutdown_grace
            if logs.set_level(loaded.settings.log_level):
                log.info("log level now %s", loaded.settings.log_level)
            # The records made before the reload go to the file as it was (renamed by a log
            # rotation), those made after it to the one it opens; and the service's own records,
            # like every other, through the Fanout: after the records made before them.
            self.fanout.deliver()
            try:
                await self.sink.reopen(loaded.settings.events)
            except OSError as exc:
                log.error(
                    "event log %s: %s; still writing to the file open before",
                    loaded.settings.events, exc.strerror or exc,
                )  # fmt: skip
            finally:
                # In force from here on, whatever cuts the reopening short (a stop: then they go
                # to the file open before).
                self.fanout.emit(ConfigLoaded(source, True))
                self.fanout.emit(PolicyLoaded(loaded.policy.name, loaded.policy.digest, True))
            log.info(
                "reloaded; policy %s (sha256 %s)", loaded.policy.name, loaded.policy.digest[:12]
            )
        finally:
            if not self.proxy.stopping.is_set():  # STOPPING=1 said already: no READY=1 after it
                self.notifier.ready()

    async def _report_store_drops(self, store: StoreSink, every: float = 60.0) -> None:
        """A record in the event log whenever statistics were lost (besides the metrics)."""
        while True:
            await trio.sleep(every)
            report_store_drops(store, self.fanout)

    def _health(self) -> tuple[bool, str]:
        """Healthy while sessions are served. A statistics store that is away does not make the
        proxy unhealthy: sessions go on and their rows wait in the spool, and proxies sharing one
        store must not all leave a load balancer's pool at once over statistics
        (`imapveil_store_up` is what to alert on)."""
        if self.proxy.stopping.is_set():
            return False, "stopping"
        store = self.store
        if store is None or store.connected:
            return True, "ok"
        if store.spool is None:
            return True, "ok; statistics store away, no spool: rows beyond the queue are lost"
        return True, f"ok; statistics store away, {store.spool_bytes} octets in the spool"

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)


DESCRIPTORS_RESERVE = 64
"""Descriptors beyond two a session (a client's and its upstream's): listeners, the event log,
the store, the metrics port."""


def descriptors(max_sessions: int) -> int:
    """Raise the soft limit of open descriptors to the hard one (a shell's 1024 holds ~500
    sessions, two descriptors each, whatever `max_sessions` says; Go's runtime does the same),
    and say so when even that cannot hold `max_sessions`. The limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.debug("could not raise the descriptor limit to %s: %s", hard, exc)
    need = 2 * max_sessions  # a gross shortfall is what to say (the reserve is a guess)
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "max_sessions %d needs about %d open descriptors, the limit is %d: clients beyond "
            "about %d sessions get * BYE (raise LimitNOFILE, or lower max_sessions)",
            max_sessions, need, soft, max(0, (soft - DESCRIPTORS_RESERVE) // 2),
        )  # fmt: skip
    return int(soft)


def report_store_drops(store: StoreSink, sink: Sink, *, final: bool = False) -> None:
    """A `store_dropped` record (and a warning) for what was lost since the last one, if any.
    The final one, at exit, only the record: the writer has just logged its totals."""
    lost = store.take_drops()
    if lost is None:
        return
    total = store.counts["dropped"]
    if not final:
        log.warning(
            "statistics lost (neither stored nor spooled): %d sessions (%d items)",
            lost.sessions, lost.items,
        )  # fmt: skip
    sink.emit(StoreDropped(lost.items, total.items, lost.sessions, total.sessions))


def check(config: str, overrides: Mapping[str, Any]) -> Loaded:
    """`imapveil check-config`: everything `serve` would check before listening."""
    loaded = load_all(config, overrides)
    events = loaded.settings.events
    if events != "-":
        parent = Path(events).parent
        if not parent.exists():
            raise ConfigError(f"events: directory {parent} does not exist")
    listen = loaded.settings.listen
    try:
        socket.getaddrinfo(listen.host or None, listen.port)
    except OSError as exc:
        raise ConfigError(f"listen: {listen}: {exc}") from None
    return loaded
