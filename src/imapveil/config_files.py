"""Checks of the files a configuration names, done before anything is created (`serve` and
`check-config` both run them), and where `stats` and `report` find the service's store."""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path

from imapveil.config import DECLARATIONS, ConfigError, Settings
from imapveil.identity import default_key_file
from imapveil.settings_file import open_regular
from imapveil.shown import shown
from imapveil.stats.labels import LabelError, read_labels


def check_files(settings: Settings) -> None:
    """Files imapveil writes must be in existing directories (the default state directory is
    created, an explicitly configured one is not); files it reads must be readable, the
    certificate and key usable, the fingerprint labels valid. Raises ConfigError naming the
    setting, the file and the problem."""
    for d in DECLARATIONS:
        value = getattr(settings, d.name)
        if d.path == "out" and value and value not in ("-", "off"):
            if d.name == "store" and value.startswith(("postgresql://", "postgres://")):
                continue
            parent = Path(value.removeprefix("sqlite://")).parent
            try:
                found = parent.is_dir()
            except OSError as exc:  # EACCES on the way there, say
                raise ConfigError(f"{d.name}: {shown(value)}: {exc.strerror or exc}") from None
            if not found:
                raise ConfigError(
                    f"{d.name}: {shown(value)}: directory {shown(str(parent))} does not exist"
                )
        if d.path == "in" and value:
            try:
                with open_regular(value) as f:  # a named pipe is refused, not waited for
                    f.read(1)
            except OSError as exc:
                raise ConfigError(f"{d.name}: {shown(value)}: {exc.strerror or exc}") from None
    if settings.fingerprint_labels:
        try:
            read_labels(Path(settings.fingerprint_labels))
        except LabelError as exc:
            raise ConfigError(f"fingerprint_labels: {exc}") from None
    if settings.cert and settings.key:
        check_certificate(settings.cert, settings.key)
    if settings.upstream_ca:
        try:
            ssl.create_default_context(cafile=settings.upstream_ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"upstream_ca: {shown(settings.upstream_ca)}: no usable PEM certificate "
                f"({_reason(exc)})"
            ) from None


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----")
_PEM_KEY = re.compile(rb"-----BEGIN ((RSA|EC|ENCRYPTED) )?PRIVATE KEY-----")


def check_certificate(cert: str, key: str) -> None:
    """`cert` and `key` as the client leg loads them; errors say FILE: problem."""
    cert_path, key_path = cert, key
    try:
        cert_text, key_text = Path(cert).read_bytes(), Path(key).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{shown(str(exc.filename))}: {exc.strerror or exc}") from None
    cert, key = shown(cert), shown(key)  # as errors show them
    if not _PEM_CERT.search(cert_text):
        raise ConfigError(f"cert: {cert}: no PEM certificate in it")
    found = _PEM_KEY.search(key_text)
    if not found:
        raise ConfigError(f"key: {key}: no PEM private key in it")
    if found.group(2) == b"ENCRYPTED" or b"Proc-Type: 4,ENCRYPTED" in key_text:
        raise ConfigError(f"key: {key}: the key is encrypted; imapveil needs it unencrypted")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_path, key_path, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"key: {key}: does not match the certificate in {cert}") from None
        if "PEM" in str(exc) and (b"-----END CERTIFICATE-----" not in cert_text):
            raise ConfigError(f"cert: {cert}: a truncated PEM certificate") from None
        raise ConfigError(f"cert: {cert}, key: {key}: not usable ({_reason(exc)})") from None
    except OSError as exc:
        raise ConfigError(f"{shown(str(exc.filename or cert))}: {exc.strerror or exc}") from None


def _reason(exc: ssl.SSLError) -> str:
    return (exc.reason or str(exc)).lower().replace("_", " ")


SYSTEM_STATE_DIRECTORY = Path("/var/lib/imapveil")
"""The shipped unit's StateDirectory=."""


def statistics_stores(settings: Settings) -> list[str]:
    """Where `imapveil stats` and `report` look for the service's store, best first.

    As the service derives it: `store`, else stats.sqlite beside `user_key_file`, else in
    $STATE_DIRECTORY. An administrator's shell has no $STATE_DIRECTORY, so without those the
    shipped unit's state directory (/var/lib/imapveil) and the user's own state directory are
    both candidates: the system's first for root, the user's first for anyone else."""
    if settings.store or settings.user_key_file or os.environ.get("STATE_DIRECTORY"):
        url = settings.store_url()
        return [url] if url else []
    system = str(SYSTEM_STATE_DIRECTORY / "stats.sqlite")
    own = str(default_key_file().with_name("stats.sqlite"))
    return [system, own] if os.geteuid() == 0 else [own, system]
