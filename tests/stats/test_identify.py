"""Platform naming: a system's name, never a device model recorded after it."""

from __future__ import annotations

import pytest

from imapveil.stats.identify import identify


@pytest.mark.parametrize(
    ("os_value", "platform"),
    [
        ("android", "Android"),
        ("Android 13", "Android"),
        ("Android 13; SM-S911B", "Android"),
        ("iOS 17.1 (iPhone15,2)", "iOS"),
        ("Mac OS X", "macOS"),
        ("Windows 10; Surface Pro 7", "Windows"),
        ("sunos", "sunos"),
        ("SunOS 5.11; T5-2", "SunOS 5.11"),
        ("; SM-S911B", None),
        (None, None),
    ],
)
def test_platform_never_holds_a_device_model(os_value: str | None, platform: str | None) -> None:
    client = identify({"name": "Some Mail", "os": os_value})
    assert client.platform == platform
