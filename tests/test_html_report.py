"""`optbench report DIR --html`: one self-contained page, checked in a real headless browser (Debian's
chromium): every section is there, every embedded figure decodes, and text from records cannot run code."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optbench.cli import app
from tests.test_analysis import four

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; "
                                    ".ci/run installs it)")

# Appended to a copy of the page before it is opened: after load, writes what the browser made of the
# page into the DOM, which --dump-dom then prints. The page itself has no script.
PROBE = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
    pwned: window.__pwned || null,
    scripts: document.scripts.length,
    sections: Array.from(document.querySelectorAll("section[id]")).map(s => [s.id, s.innerText.length]),
  });
  document.body.appendChild(out);
});
</script>"""

PAYLOADS = {
    "status": '<script>window.__pwned = "status_detail"</script>',
    "hparam": '<img src=x onerror="window.__pwned = \'hparam\'">',
    "device": '</td></table><script>window.__pwned = "device_name"</script>',
}


def records_with_environment() -> list[dict]:
    records = four()
    for rec in records:
        rec["environment"] = {"device": "cuda", "device_name": "NVIDIA Test GPU", "cpu_threads": 8, "python": "3.11.2",
                              "optbench": "0.1.0", "packages": {"torch": "2.14.1", "timm": "1.0.31",
                                                                "lion-pytorch": "0.2.5"}}
        rec["config"]["patch_size"] = 4
    return records


def write(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(records):
        (folder / f"r{i}.json").write_text(json.dumps(rec))


def rendered(page: Path, tmp_path: Path) -> tuple[str, dict]:
    """The DOM chromium built from `page` (with the probe appended), and the probe's findings."""
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                           probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, "the page did not load in chromium: " + done.stdout[-2000:]
    import html

    return done.stdout, json.loads(html.unescape(found.group(1)))


def dom_text(dom: str) -> str:
    """The page's text as a reader sees it: tags dropped, entities decoded, whitespace collapsed."""
    import html

    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@needs_chromium
def test_the_html_report_renders_in_chromium_with_every_section_and_figure(tmp_path):
    results = tmp_path / "results"
    write(results, records_with_environment())
    result = CliRunner().invoke(app, ["report", str(results), "--html"])
    assert result.exit_code == 0, result.output
    pages = list(results.glob("comparison-*.html"))
    assert len(pages) == 1 and str(pages[0]) in "".join(result.output.split())
    text = pages[0].read_text(encoding="utf-8")
    assert "<script" not in text and "src=\"http" not in text  # static and self-contained

    dom, probe = rendered(pages[0], tmp_path)
    sections = dict(probe["sections"])
    for section in ("results", "verdicts", "figures", "hyperparameters", "seeds", "config", "environment", "notes"):
        assert sections.get(section, 0) > 20, (section, sections)
    for verdict in ("verdict-memory", "verdict-accuracy-literal", "verdict-accuracy-statistical"):
        assert f'id="{verdict}"' in dom, verdict
    # The verdicts and their reasons are the analysis' own, as the text report prints them.
    report_text = " ".join(CliRunner().invoke(app, ["report", str(results)]).output.split())
    for phrase in ("Lion saves 1.8% of peak memory", "misses the 30% target", "mean accuracy >= AdamW's mean accuracy"):
        assert phrase in report_text and phrase in dom_text(dom), phrase
    for value in ("Schedule-Free AdamW", "50.00%", "NVIDIA Test GPU", "torch 2.14.1", "cifar100", '"lr": 0.001'):
        assert value in dom_text(dom), value
    # Every figure is embedded and decoded at its real size.
    pngs = sorted(results.glob("comparison-*.png"))
    assert len(pngs) == 2 and len(probe["images"]) == 2
    sizes = sorted(png_size(p.read_bytes()) for p in pngs)
    assert sorted((w, h) for complete, w, h in probe["images"] if complete) == sizes
    assert probe["scripts"] == 1 and probe["pwned"] is None  # only the probe ran


@needs_chromium
def test_text_from_records_is_escaped_and_never_runs(tmp_path):
    records = records_with_environment()
    records[1]["status"] = "diverged"
    records[1]["status_detail"] = PAYLOADS["status"]
    records[1]["final_test_acc"] = None
    for rec in records:
        rec["environment"]["device_name"] = PAYLOADS["device"]
    records[2]["config"]["hparams"]["note"] = PAYLOADS["hparam"]
    results = tmp_path / "results"
    write(results, records)
    result = CliRunner().invoke(app, ["report", str(results), "--html"])
    assert result.exit_code == 0, result.output
    page = next(results.glob("comparison-*.html"))
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text and "<img src=x" not in text
    assert "&lt;script&gt;window.__pwned = &quot;status_detail&quot;&lt;/script&gt;" in text

    dom, probe = rendered(page, tmp_path)
    assert probe["pwned"] is None and probe["scripts"] == 1, probe
    assert "&lt;script&gt;window.__pwned" in dom  # shown as text
    assert len(probe["images"]) == 2  # the injected <img> did not become an element


# --- the figures the page embeds --------------------------------------------------------------------


@pytest.fixture
def drawn(monkeypatch):
    """What each figure saved held: its texts, line labels and x positions, and its title."""
    from matplotlib.figure import Figure

    seen = []
    save = Figure.savefig

    def spy(fig, *args, **kwargs):
        seen.append({"texts": [t.get_text() for ax in fig.axes for t in ax.texts],
                     "lines": {line.get_label(): list(line.get_xdata()) for ax in fig.axes for line in ax.lines},
                     "title": fig._suptitle.get_text() if fig._suptitle else ""})
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


def test_the_memory_figure_shows_each_saving_in_percent_and_the_30_percent_line(tmp_path, drawn):
    from optbench.analysis import summary_table
    from optbench.plots import memory_chart

    records = four()
    memory_chart(records, tmp_path / "memory.png", "t")
    table = summary_table(records).set_index("optimizer")
    texts = drawn[-1]["texts"]
    assert f"saves {100 * table.loc['lion', 'peak_saving']:.1f}% of AdamW's peak" in texts
    assert f"{-100 * table.loc['sophia', 'peak_saving']:.1f}% more peak than AdamW" in texts
    line = next(x for label, x in drawn[-1]["lines"].items() if label.startswith("course target: 30% below"))
    assert line[0] == pytest.approx(0.7 * table.loc["adamw", "peak_mean"] / 2**20)


def test_the_curves_figure_marks_disturbed_timings(tmp_path, drawn):
    from optbench.plots import learning_curves
    from optbench.timing import record_disturbance as timing_disturbed  # what the figure marks by

    records = four()
    assert timing_disturbed(records[1]) == []  # a record without the flag (or before it existed)
    # The calibration kernel took 3x as long after training as before: the analysis calls that disturbed.
    records[1]["timing"] = {"calibration_before_s": 0.1, "calibration_after_s": 0.3}
    assert len(timing_disturbed(records[1])) == 1 and "calibration kernel" in timing_disturbed(records[1])[0]
    learning_curves(records, tmp_path / "curves.png", "t")
    assert "timing disturbed (busy machine): Lion seed 0" in drawn[-1]["title"]
    assert "timing disturbed" in drawn[-1]["lines"]
    learning_curves(four(), tmp_path / "calm.png", "t")
    assert "disturbed" not in drawn[-1]["title"] and "timing disturbed" not in drawn[-1]["lines"]
