"""Issue 15: the report as a real browser lays it out (headless Chromium, as the end-to-end test
runs it). A script added to a copy of the page measures every text of every chart with
getBoundingClientRect and writes what it found into the document, which `--dump-dom` prints:
each label and number inside its chart's box, labels left of their bars and numbers right of
them, nothing wider than the window; at a desktop and at a phone's width, in dark mode too; and
printed, A4 pages.

docs/report.png is made from the same synthetic fleet (not checked here):

    python3 -m tests.stats.test_report_layout docs/report.png
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imapveil.stats.report import html_report
from tests.stats import test_report_inventory as fleet

MEASURE = """<script>
const found = {charts: 0, texts: 0, bars: 0, cells: 0, problems: []};
const inside = (r, box) => r.left >= box.left - 0.5 && r.right <= box.right + 0.5
  && r.top >= box.top - 0.5 && r.bottom <= box.bottom + 0.5;
const said = (t) => (t.lastChild ? t.lastChild.textContent : t.textContent);
for (const svg of document.querySelectorAll("svg.chart")) {
  found.charts += 1;
  const box = svg.getBoundingClientRect();
  const name = svg.getAttribute("aria-label");
  for (const t of svg.querySelectorAll("text")) {
    found.texts += 1;
    const r = t.getBoundingClientRect();
    if (r.width === 0 || !inside(r, box)) {
      found.problems.push(`${name}: "${said(t)}" at ${r.left}..${r.right} x ${r.top}..${r.bottom}`
        + ` not inside ${box.left}..${box.right} x ${box.top}..${box.bottom}`);
    }
  }
  for (const bar of svg.querySelectorAll("rect.bar")) {
    found.bars += 1;
    const b = bar.getBoundingClientRect();
    const label = bar.previousElementSibling.getBoundingClientRect();
    const number = bar.nextElementSibling.getBoundingClientRect();
    if (label.right > b.left + 0.5 || number.left < b.right - 0.5) {
      found.problems.push(`${name}: "${said(bar.previousElementSibling)}" overlaps its bar`);
    }
  }
}
for (const svg of document.querySelectorAll("svg.matrix")) {
  const name = svg.getAttribute("aria-label");
  const cells = [...svg.querySelectorAll("rect.cell")];
  const left = Math.min(...cells.map((c) => c.getBoundingClientRect().left));
  const top = Math.min(...cells.map((c) => c.getBoundingClientRect().top));
  for (const cell of cells) {
    found.cells += 1;
    const number = cell.nextElementSibling;
    if (!inside(number.getBoundingClientRect(), cell.getBoundingClientRect())) {
      found.problems.push(`${name}: "${said(number)}" outside its cell`);
    }
  }
  const heads = [...svg.querySelectorAll("text.head")];
  heads.forEach((head, i) => {
    const r = head.getBoundingClientRect();
    if (r.bottom > top + 0.5) found.problems.push(`${name}: heading "${said(head)}" over a cell`);
    const next = heads[i + 1] && heads[i + 1].getBoundingClientRect();
    if (next && next.left < r.right - 0.5) {
      found.problems.push(`${name}: headings "${said(head)}" and "${said(heads[i + 1])}" overlap`);
    }
  });
  for (const row of svg.querySelectorAll("text.row")) {
    if (row.getBoundingClientRect().right > left + 0.5) {
      found.problems.push(`${name}: row "${said(row)}" reaches into the cells`);
    }
  }
}
const page = document.documentElement;
found.overflow = page.scrollWidth > window.innerWidth;
found.background = getComputedStyle(document.body).backgroundColor;
const out = document.createElement("pre");
out.id = "layout";
out.textContent = JSON.stringify(found);
document.body.appendChild(out);
</script>"""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    program = shutil.which("chromium")
    assert program, "chromium is installed by scripts/check"
    flags = [program, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}"]  # fmt: skip
    return subprocess.run(
        [*flags, *args], capture_output=True, text=True, timeout=90, check=False
    )  # fmt: skip


def fleet_page(url: str) -> str:
    """The report of the synthetic fleet with clients that change, the extensions everyone
    uses and users inferred from labelled fingerprints, for its second half (six weeks,
    compared with the six before)."""
    store = fleet.make_fleet(url)
    try:
        fleet.add_changes(store, edges=False)
        fleet.add_traits(store, fleet.FLEET + fleet.CHANGING)
        return html_report(store, fleet.SINCE, fleet.UNTIL, now=fleet.NOW, labels=fleet.LABELS)
    finally:
        store.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fleet_page(str(tmp_path_factory.mktemp("fleet") / "stats.sqlite"))


def measure(page: str, tmp_path: Path, *flags: str) -> dict[str, object]:
    measured = tmp_path / "measured.html"
    measured.write_text(page.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = chromium(tmp_path, *flags, "--dump-dom", measured.as_uri())
    found = re.search(r'<pre id="layout">(.*?)</pre>', dom.stdout, re.DOTALL)
    assert found, dom.stderr[-2000:]
    result: dict[str, object] = json.loads(found.group(1).replace("&quot;", '"'))
    return result


@pytest.mark.parametrize("width", [1280, 420])
def test_every_label_and_number_lies_inside_its_chart(
    page: str, tmp_path: Path, width: int
) -> None:
    found = measure(page, tmp_path, f"--window-size={width},3000")
    assert found["problems"] == []
    assert found["charts"] == 8 and found["overflow"] is False
    # Every bar chart's label, bar and number, the trend's axis, week labels and legend, the
    # extensions' headings, rows and cells.
    bars = page.count('<rect class="bar"')
    assert found["bars"] == bars > 50
    assert found["cells"] == page.count('<rect class="cell"') > 25
    # The sections a reader needs: what changed (the table too), the extensions.
    assert '<table data-table="changes">' in page and f"largest changes: {fleet.K9} " in page
    assert "<td>inferred from a labelled fingerprint</td>" in page
    assert '<table data-table="fingerprints">' in page
    assert found["texts"] == page.count("<text")
    assert found["background"] == "rgb(255, 255, 255)"


def test_dark_mode(page: str, tmp_path: Path) -> None:
    found = measure(page, tmp_path, "--window-size=1280,3000", "--force-dark-mode")
    assert found["problems"] == []
    assert found["background"] == "rgb(22, 24, 28)"


def test_printed_on_a4(page: str, tmp_path: Path) -> None:
    source = tmp_path / "report.html"
    source.write_text(page, encoding="utf-8")
    pdf = tmp_path / "report.pdf"
    done = chromium(tmp_path, "--no-pdf-header-footer", f"--print-to-pdf={pdf}", source.as_uri())
    data = pdf.read_bytes() if pdf.exists() else b""
    assert data.startswith(b"%PDF"), done.stderr[-2000:]
    boxes = re.findall(rb"/MediaBox\s*\[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", data)
    assert boxes and len(boxes) >= 2  # a report of this fleet takes pages
    for w, h in boxes:  # A4: 210 x 297 mm, 595.3 x 841.9 points
        assert abs(float(w) - 595.3) < 2 and abs(float(h) - 841.9) < 2, (w, h)


def test_nothing_wider_than_a4_when_printed(page: str, tmp_path: Path) -> None:
    """The print rules applied on screen at A4's printable width (210 mm less 2 x 14 mm of
    margin: 688 CSS pixels): tables are not scrolled in print, so a table wider than the paper
    would widen the page."""
    printed = page.replace("@media print {", "@media all {")
    assert printed != page
    found = measure(printed, tmp_path, "--window-size=688,3000")
    assert found["problems"] == [] and found["overflow"] is False
    assert found["background"] == "rgb(255, 255, 255)"


def screenshot(target: Path) -> None:
    """docs/report.png: the report of the synthetic fleet, as a desktop browser shows it."""
    work = target.resolve().parent / ".report-shot"
    work.mkdir(exist_ok=True)
    try:
        source = work / "report.html"
        source.write_text(fleet_page(str(work / "stats.sqlite")), encoding="utf-8")
        chromium(work, f"--screenshot={target.resolve()}", "--window-size=1400,2600",
                 "--hide-scrollbars", source.as_uri())  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]))
