"""Build a one-page Jupyter Book that shows every kvlib widget, for trying the offline widget setup
(and tests/test_browser.py) without the chapters.

    python scripts/build_widget_demo.py [OUT_DIR]     # default: /tmp/kvlib-widget-demo
    KVLIB_BOOK_HTML=/tmp/kvlib-widget-demo/_build/html KVLIB_BOOK_PAGES=demo.html \\
        python -m pytest tests/test_browser.py

It writes a throwaway book (config, toc, one notebook) into OUT_DIR, fetches the widget JavaScript
(scripts/fetch_widget_js.sh) and builds the book with the same widget settings as the course's
_config.yml. Nothing is written into the repository except _offline/ (gitignored).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
title: kvlib widget demo
only_build_toc_files: true
execute:
  execute_notebooks: force
  timeout: 300
sphinx:
  config:
    nb_execution_raise_on_error: true
    html_extra_path: ["{offline}"]
    nb_ipywidgets_js:
      widgets/require.js: {{}}
      widgets/shim.js: {{}}
      widgets/embed-amd.js: {{}}
    mathjax_path: mathjax/tex-mml-chtml.js
parse:
  myst_enable_extensions: [dollarmath]
"""

CELLS = [
    ("markdown", "# kvlib widgets\n\nEvery widget of `kvlib.widgets`, rendered from the saved "
                 "widget state. The cache of one token: $2 \\times L \\times H_{kv} \\times d "
                 "\\times b$ bytes."),
    ("code", "import torch\nimport kvlib\nfrom kvlib.measure import cache_frames_for\n"
             "from kvlib.plots import plot_cache_state\nfrom kvlib.widgets import CacheExplorer, "
             "LatencyMonitor, MemoryCalculator\n\ntorch.set_num_threads(1)\n"
             "model = kvlib.load_model('tiny')"),
    ("markdown", "## The plain picture"),
    ("code", "runs = cache_frames_for(model, 'The cache keeps the keys', 10, "
             "['concat', ('sliding', 4)])\nplot_cache_state(runs, 'sliding (window 4)', 6)"),
    ("markdown", "## Cache explorer"),
    ("code", "CacheExplorer(model, 'The cache keeps the keys', 10, ['concat', ('sliding', 4)])"),
    ("markdown", "## Latency monitor"),
    ("code", "monitor = LatencyMonitor(model, 'The cache keeps', max_new_tokens=40)\n"
             "monitor.run()\nmonitor"),
    ("markdown", "## Memory calculator"),
    ("code", "MemoryCalculator('llama-3-8b', context=32768)"),
]


def write_book(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "_config.yml").write_text(CONFIG.format(offline=(ROOT / "_offline").as_posix()))
    (out / "_toc.yml").write_text("format: jb-book\nroot: demo\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown"
                else nbformat.v4.new_code_cell(src) for kind, src in CELLS]
    nbformat.write(nb, out / "demo.ipynb")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kvlib-widget-demo").resolve()
    subprocess.run(["bash", str(ROOT / "scripts" / "fetch_widget_js.sh")], check=True)
    write_book(out)
    jb = Path(sys.executable).with_name("jupyter-book")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([str(jb), "build", str(out), "-W", "-n", "--keep-going"], check=True, env=env)
    print(f"built {out / '_build' / 'html' / 'demo.html'}")


if __name__ == "__main__":
    main()
