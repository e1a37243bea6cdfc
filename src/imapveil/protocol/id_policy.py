"""What the core needs of an ID policy, as structural types: `imapveil.policy.Policy` and its
`Outcome` fit them without either package importing the other (the service hands the core a
callable that returns the policy in force)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from imapveil.rfc2971 import IdFields


class IdOutcome(Protocol):
    """What a policy decided for one ID list."""

    @property
    def forwarded(self) -> IdFields: ...
    @property
    def recorded(self) -> dict[str, str | None]: ...
    @property
    def dropped(self) -> tuple[str, ...]: ...  # names of fields not forwarded
    @property
    def decisions(self) -> tuple[object, ...]: ...
    @property
    def changed(self) -> bool: ...


class IdPolicy(Protocol):
    """A policy: its name and digest (records say which policy decided) and how it decides."""

    @property
    def name(self) -> str: ...
    @property
    def digest(self) -> str: ...

    def apply(
        self, fields: IdFields, *, hasher: Callable[[bytes], str], trusted_client: bool = False
    ) -> IdOutcome: ...
