"""The check script that CI runs must not fail for reasons of its own making."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "scripts" / "check"

# A command that writes its version in several writes, as haproxy -v does: the first line, then
# more after the reader may have gone. More than a pipe holds (64 KiB), so that a reader that
# stops after the first line surely leaves it writing into a closed pipe: with 200 lines
# (2 KiB) the writer was often done before `head` went, and the control below passed by luck.
CHATTY = "printf 'first\\n'; for i in $(seq 20000); do printf 'more %s\\n' $i; done"


def _function(name: str) -> str:
    text = CHECK.read_text()
    match = re.search(rf"^{name}\(\) {{\n.*?^}}\n", text, re.M | re.S)
    assert match, f"{name} is defined in scripts/check"
    return match.group(0)


def _run_under_pipefail(body: str) -> subprocess.CompletedProcess[str]:
    script = f"set -euo pipefail\n{body}\n"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)


def test_first_line_survives_a_command_that_writes_after_its_first_line() -> None:
    body = _function("first_line") + f"chatty() {{ {CHATTY}; }}\n"
    for _ in range(20):
        result = _run_under_pipefail(body + "first_line chatty")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "first\n"


def test_head_would_have_failed_the_run() -> None:
    # The control: what the script did before (exit 141 on CI, one run in fifteen with haproxy;
    # every run here, the writer writing more than the pipe holds).
    for _ in range(3):
        result = _run_under_pipefail(f"chatty() {{ {CHATTY}; }}\nchatty | head -1")
        assert result.returncode == 141


def test_no_pipe_into_head_in_the_check_script() -> None:
    for number, line in enumerate(CHECK.read_text().splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        assert not re.search(r"\|\s*head\b", line), (
            f"scripts/check:{number}: {line.strip()} (use first_line)"
        )
