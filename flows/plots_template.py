"""An HTML template for `dvc plots show` with vega, vega-lite and vega-embed inlined: plots offline.

DVC's own page loads the three libraries from cdn.jsdelivr.net; with no network (this project's default
world) the page stays blank. This builds, once per checkout at set-up (`make setup`), a template with the
libraries inside it, from the npm registry's packages of the very versions the installed DVC asks for:

    python -m flows.plots_template            # .offline/npm/*.tgz -> .offline/dvc_plots.html, and
                                              # `dvc config --local plots.html_template ../.offline/dvc_plots.html`
    dvc plots show                            # dvc_plots/index.html now opens with no network

The template has DVC's placeholders {refresh_tag} and {plot_divs} but not {scripts}: DVC puts its CDN
<script src> tags there, so leaving it out keeps them out of the page. The setting goes to .dvc/config.local
(git-ignored), not .dvc/config: DVC reads a missing template path as the template text itself and fails,
so a committed setting would break `dvc plots show` on every checkout that has not built the file.
Nothing here is committed: .offline/ is git-ignored. Without npm or the registry it says so in one line
and exits 0 (set-up goes on; tests/test_offline_report.py then fails naming this command).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from dvc_render.vega import VegaRenderer

from depthtune.errors import first_line
from depthtune.files import write_text_atomic

OUT_DIR = Path(".offline")
TEMPLATE_NAME = "dvc_plots.html"
# what dvc_render's VegaRenderer loads (dvc-render 1.x); read from the installed DVC when it says otherwise
DEFAULT_VERSIONS = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
BUILD_FILE = {"vega": "package/build/vega.min.js", "vega-lite": "package/build/vega-lite.min.js",
              "vega-embed": "package/build/vega-embed.min.js"}  # UMD builds: globals vega, vegaLite, vegaEmbed
NPM_TIMEOUT_S = 180

PAGE = """<!DOCTYPE html>
<html>
<head>
    <!-- {marker} -->
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def dvc_vega_versions() -> dict[str, str]:
    """{package: version} of the vega libraries the installed DVC's HTML page loads from its CDN."""
    found = dict(re.findall(r"npm/(vega(?:-lite|-embed)?)@([0-9][0-9.]*)", getattr(VegaRenderer, "SCRIPTS", "")))
    return {name: found.get(name, version) for name, version in DEFAULT_VERSIONS.items()}


def marker(versions: dict[str, str]) -> str:
    """The first comment of the template: what it inlines (a rebuild happens when it differs)."""
    return "depthtune offline DVC plots template: " + " ".join(f"{n}@{v}" for n, v in versions.items())


def npm_pack(versions: dict[str, str], dest: Path, npm: str) -> dict[str, Path]:
    """`npm pack` each package@version into dest (the registry's tarballs); {package: tarball}."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {name: dest / f"{name}-{version}.tgz" for name, version in versions.items()}
    missing = [f"{name}@{versions[name]}" for name, path in wanted.items() if not path.is_file()]
    if missing:
        env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false",
               "npm_config_audit": "false", "npm_config_fetch_retries": "1", "npm_config_fetch_timeout": "30000"}
        argv = [npm, "pack", "--loglevel=error", "--pack-destination", str(dest.resolve()), *missing]
        subprocess.run(argv, cwd=dest, env=env, check=True, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    return wanted


def inline_script(tarball: Path, member: str) -> str:
    """One library as an inline <script>: a literal "</script" inside it would end the element early."""
    with tarfile.open(tarball, "r:gz") as tar:
        js = tar.extractfile(member).read().decode("utf-8")
    return "<script>\n" + js.replace("</script", "<\\/script") + "\n</script>"


def build_template(out_dir: Path = OUT_DIR, npm: str = "npm") -> Path:
    """out_dir/dvc_plots.html with the three libraries inlined (rebuilt only when the versions change)."""
    versions = dvc_vega_versions()
    template = out_dir / TEMPLATE_NAME
    if template.is_file() and marker(versions) in template.read_text(encoding="utf-8")[:400]:
        os.utime(template)  # up to date: newer than this script, so make does not ask again
        return template
    tarballs = npm_pack(versions, out_dir / "npm", npm)
    scripts = "\n".join(inline_script(tarballs[name], BUILD_FILE[name]) for name in versions)  # vega first
    page = PAGE.format(marker=marker(versions), scripts=scripts)
    for placeholder in ("{plot_divs}", "{refresh_tag}"):
        assert page.count(placeholder) == 1, f"{placeholder} must occur once in the template"
    write_text_atomic(template, page)
    return template


def set_dvc_config(project: Path, template: Path) -> None:
    """plots.html_template in project/.dvc/config.local; DVC resolves a relative path from .dvc/."""
    value = os.path.relpath(template.resolve(), (project / ".dvc").resolve())
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", value],
                   cwd=project, check=True, capture_output=True, text=True)


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.plots_template", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder for the tarballs and template ({OUT_DIR})")
    ap.add_argument("--npm", default="npm", help="the npm client (default: npm on PATH)")
    args = ap.parse_args(argv)
    npm = shutil.which(args.npm)
    if npm is None:
        print(f"plots template: {args.npm} not found, skipped; `dvc plots show` pages need the network "
              "(install npm, then `python -m flows.plots_template`)")
        return 0
    try:
        template = build_template(args.out, npm)
    except (subprocess.SubprocessError, OSError, KeyError, tarfile.TarError) as exc:
        detail = RuntimeError(exc.stderr) if getattr(exc, "stderr", None) else exc  # npm's own words first
        print(f"plots template: not built ({first_line(detail)}); `dvc plots show` pages need the network")
        return 0
    if Path(".dvc").is_dir():
        set_dvc_config(Path("."), template)
        where = "plots.html_template set in .dvc/config.local"
    else:
        where = "no .dvc/ here: pass it with `dvc plots show --html-template`"
    print(f"plots template: {template} ({template.stat().st_size / 2 ** 20:.1f} MiB, vega inlined); {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
