"""The reports a person opens offline, opened in a real headless Chromium with every host name unresolvable.

Issue 16: `dvc plots show` writes a page that loads vega, vega-lite and vega-embed from cdn.jsdelivr.net, so
with no network it is blank. Two pages must show their figures with no network at all:
- reports/index.html, written by the compare stage (depthtune/report/page.py): figures as data URIs;
- `dvc plots show` with the template of flows/plots_template.py (vega inlined), built by `make setup`.

How a page is checked (`open_page`): Chromium runs twice on the page with `--host-resolver-rules=MAP * ~NOTFOUND`
(any request off this machine fails) and console logging on stderr:
1. `--dump-dom` of a copy with a probe script appended: after load it writes each figure element's box
   (img, or the canvas/svg vega-embed draws) and whether the image decoded, into the DOM;
2. `--screenshot` of the page itself at the same window size.
Both runs write Chromium's NetLog: the page may ask the network for nothing (offline, any such request
fails; Chromium's own background requests are told apart by their initiator). A page passes when it made
no network request, the console shows no error (an uncaught exception, a failed load), every expected
figure is there with a non-empty box, and in the screenshot each box holds a figure: at least
3% of its pixels non-white and at least 8 distinct grey levels (a blank or one-colour box fails).
The DVC page without the template is opened the same way and must fail: the check sees what the issue saw.

Chromium is Debian's `chromium` (`make setup` installs it as root with apt-get); a missing browser or template
fails with the command that provides it, never a skip.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, in_project, make_project, project_env, run_stages, tiny_params

WINDOW = (1400, 5200)  # css px; the whole report fits, so one viewport screenshot holds every figure
VARIANTS = {"full": {}, "probe": {"train_top": 0, "train": {"lr": 5e-3}}}
TEMPLATE = ROOT / ".offline" / "dvc_plots.html"

PROBE = """<script>
window.addEventListener('load', () => setTimeout(() => {
  const boxes = [];
  for (const el of document.querySelectorAll('img, .vega-embed canvas, .vega-embed svg.marks')) {
    const r = el.getBoundingClientRect();
    boxes.push({id: el.id || (el.closest('[id]') || {}).id || '', tag: el.tagName.toLowerCase(),
                x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
                decoded: el.tagName === 'IMG' ? el.complete && el.naturalWidth > 0 : true});
  }
  const pre = document.createElement('pre');
  pre.id = 'depthtune-probe'; pre.style.display = 'none'; pre.textContent = JSON.stringify(boxes);
  document.body.appendChild(pre);
}, 1000));
</script>
"""
CONSOLE_ERROR = re.compile(r"CONSOLE.*(Uncaught|Error|net::ERR_|Failed to load)|net::ERR_", re.IGNORECASE)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Debian's chromium is not installed: run `make setup` as root (apt-get install chromium)")
    return exe


def run_chromium(url: str, user_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={user_dir}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: every host name fails to resolve
            f"--log-net-log={user_dir}.netlog.json",  # every request the network stack saw
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", *extra, url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90)


def page_requests(netlog: Path) -> list[str]:
    """The URLs the page asked the network for (file: and data: URLs never reach the network stack).

    Chromium's own background requests (update checks, accounts) have the initiator "not an origin"; the
    page's have its origin ("null" for a file: page)."""
    log = json.loads(netlog.read_text(encoding="utf-8"))
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return sorted({e["params"]["url"] for e in log["events"]
                   if e["type"] == start and e.get("params", {}).get("initiator", "not an origin") != "not an origin"})


def open_page(page: Path, tmp: Path) -> dict:
    """{"boxes": [figure boxes], "errors": [console error lines], "png": screenshot path} of `page`."""
    html = page.read_text(encoding="utf-8")
    at = html.rindex("</body>")  # the last one: inlined libraries may hold "</body>" in their strings
    probe = page.with_name(page.stem + ".probe.html")
    probe.write_text(html[:at] + PROBE + html[at:], encoding="utf-8")
    dom = run_chromium(probe.as_uri(), tmp / "profile-dom", "--dump-dom")
    found = re.search(r'<pre id="depthtune-probe"[^>]*>(.*?)</pre>', dom.stdout, re.DOTALL)
    assert found, f"the probe did not run in {page}:\n{dom.stderr[-2000:]}"
    png = tmp / (page.stem + ".png")
    shot = run_chromium(page.as_uri(), tmp / "profile-shot", f"--screenshot={png}")
    assert png.is_file(), f"no screenshot of {page}:\n{shot.stderr[-2000:]}"
    errors = [line for line in (dom.stderr + shot.stderr).splitlines() if CONSOLE_ERROR.search(line)]
    requests = page_requests(tmp / "profile-dom.netlog.json") + page_requests(tmp / "profile-shot.netlog.json")
    return {"boxes": json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")),
            "errors": errors, "requests": requests, "png": png}


def blank_boxes(png: Path, boxes: list[dict]) -> list[str]:
    """The boxes of `boxes` that look blank in the screenshot (see the module docstring)."""
    from PIL import Image

    img = np.asarray(Image.open(png).convert("L"))
    scale = img.shape[1] / WINDOW[0]  # screenshot pixels per css px (1 unless the device scale differs)
    blank = []
    for b in boxes:
        x0, y0 = int(b["x"] * scale), int(b["y"] * scale)
        x1, y1 = int((b["x"] + b["w"]) * scale), int((b["y"] + b["h"]) * scale)
        region = img[y0:y1, x0:x1]
        ink = float((region < 235).mean()) if region.size else 0.0
        levels = len(np.unique(region // 8)) if region.size else 0
        if ink < 0.03 or levels < 8:
            blank.append(f"{b['id'] or b['tag']} at ({x0},{y0})-({x1},{y1}): {ink:.1%} ink, {levels} grey levels")
    return blank


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_data) -> Path:
    """A tiny pipeline, run through compare: two variants, their loss and confusion plot files, the reports."""
    from stages import compare

    params = tiny_params(shared_data, VARIANTS, tracking={"enabled": False})
    p = make_project(tmp_path_factory.mktemp("offline") / "project", params)
    run_stages(p, VARIANTS)
    with in_project(p):
        compare.main([])
    return p


def test_report_page_shows_every_figure_offline(project, tmp_path):
    page = project / "reports" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the report references the network"
    assert "<script" not in html, "the report needs no script"
    seen = open_page(page, tmp_path)
    assert seen["requests"] == [], "the page asked the network (offline, every such request fails)"
    assert seen["errors"] == [], "\n".join(seen["errors"])
    boxes = {b["id"]: b for b in seen["boxes"]}
    assert "fig-loss" in boxes, ("no loss-curve figure: the report dict lacks `loss_curves` ({variant: the train "
                                 "record's loss_curve}), which depthtune.report.comparison.build_report puts there")
    assert set(boxes) == {"fig-pareto", "fig-loss", "fig-depth"}, boxes
    for b in boxes.values():
        assert b["decoded"] and b["w"] > 300 and b["h"] > 150, b
        assert b["y"] + b["h"] <= WINDOW[1], f"{b['id']} is below the screenshot: raise WINDOW"
    assert blank_boxes(seen["png"], list(boxes.values())) == []
    for text in ("Variant comparison", "full", "probe", "Per class", "Most confused"):
        assert text in html


def dvc_plots_page(project: Path, out: Path, *template: str) -> Path:
    cmd = [sys.executable, "-m", "dvc", "plots", "show", *template, "-o", str(out)]
    done = subprocess.run(cmd, cwd=project, env=project_env(project), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out / "index.html"


DVC_PLOTS = {"plots_loss_full_csv", "plots_loss_probe_csv", "plots_confusion_full_csv",
             "plots_confusion_probe_csv", "reports_variants_csv", "plots_pretrain_csv"}  # dvc.yaml's plots of this project


def test_dvc_plots_page_shows_every_plot_offline(project, tmp_path):
    if not TEMPLATE.is_file():
        pytest.fail(f"{TEMPLATE} is missing: run `make setup` (or `python -m flows.plots_template`; needs npm "
                    "and the npm registry once)")
    from flows.plots_template import set_dvc_config

    set_dvc_config(project, TEMPLATE)  # as set-up does in the checkout: .dvc/config.local
    page = dvc_plots_page(project, tmp_path / "dvc_plots")
    assert "cdn.jsdelivr" not in page.read_text(encoding="utf-8")
    seen = open_page(page, tmp_path)
    assert seen["requests"] == [], "the page asked the network (offline, every such request fails)"
    assert seen["errors"] == [], "\n".join(seen["errors"])
    boxes = {b["id"]: b for b in seen["boxes"]}
    assert set(boxes) == DVC_PLOTS, boxes
    # pretrain is off in this project: its loss plot has no points, so DVC draws an empty canvas for it
    drawn = [b for name, b in boxes.items() if name != "plots_pretrain_csv"]
    for b in drawn:
        assert b["w"] > 100 and b["h"] > 100 and b["y"] + b["h"] <= WINDOW[1], b
    assert blank_boxes(seen["png"], drawn) == []


def test_dvc_default_page_is_blank_offline(project, tmp_path):
    """What the issue saw, seen by the same check: DVC's own page fetches vega from its CDN and draws nothing."""
    from dvc_render.html import PAGE_HTML  # DVC's own page, whatever .dvc/config.local says

    default = tmp_path / "dvc_default.html"
    default.write_text(PAGE_HTML, encoding="utf-8")
    page = dvc_plots_page(project, tmp_path / "dvc_plots", "--html-template", str(default))
    assert "cdn.jsdelivr.net/npm/vega@" in page.read_text(encoding="utf-8")
    seen = open_page(page, tmp_path)
    assert seen["boxes"] == []
    assert any("cdn.jsdelivr.net/npm/vega@" in url for url in seen["requests"]), seen["requests"]
    assert any("vegaEmbed is not defined" in e for e in seen["errors"]), seen["errors"]
