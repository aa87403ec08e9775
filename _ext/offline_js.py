"""Sphinx extension: the widget and math JavaScript the book serves itself (no CDN).

``make book`` fetches it into ``_offline/`` (scripts/fetch_widget_js.sh) before building. A plain
``jupyter-book build .`` gets the same: this extension runs the fetch script when the files are
missing, and if that cannot work (no npm, no registry) stops at once with a message saying what
to run, instead of a warning deep in the build about a missing ``_offline`` folder.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from sphinx.errors import ConfigError

NEEDED = ["widgets/require.js", "widgets/shim.js", "widgets/embed-amd.js",
          "mathjax/tex-mml-chtml.js"]


def missing(root: Path) -> list[str]:
    return [f for f in NEEDED if not (root / "_offline" / "_static" / f).is_file()]


def ensure_offline_js(app, config) -> None:
    root = Path(app.srcdir)
    if not missing(root):
        return
    script = root / "scripts" / "fetch_widget_js.sh"
    done = subprocess.run(["bash", str(script)], cwd=root, capture_output=True, text=True)
    if done.returncode != 0 or missing(root):
        raise ConfigError(
            f"the book's offline JavaScript is missing ({', '.join(missing(root))} under "
            f"_offline/_static) and {script.name} could not fetch it: "
            f"{(done.stderr or done.stdout).strip()[-300:]}\n"
            "Build the book with `make book` (it sets up .venv and fetches the files from npm), "
            "or install npm and run `bash scripts/fetch_widget_js.sh` once before "
            "`jupyter-book build .`."
        )


def setup(app):
    app.connect("config-inited", ensure_offline_js)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
