"""The live path of book/running.md: the venv's JupyterLab, started as `.venv/bin/jupyter lab
DIR`, serves chapter 2; headless Chromium runs its cells with the venv's kernel (Run > Run All
Cells), and the widgets answer with a kernel behind them: the cache explorer's Play button steps
the picture, the latency monitor's Run button measures again and refills its table. The page
must log no error and reach nothing outside localhost.

By default the notebook holds chapter 2's setup cells and the cells that make and show its two
widgets, verbatim (a small part of the chapter's run time; the whole chapter is nbval's and the
book build's job). KVLIB_LIVE_NOTEBOOK=05_sliding_window runs that whole chapter instead (the
latency monitor is checked where there is one).

Needs JupyterLab beside ``sys.executable`` (requirements.txt installs it), Python's
``playwright`` and a Chromium binary, found as tests/test_browser.py finds it (/usr/bin/chromium,
or CHROMIUM=/path). Skips when one is missing, unless CI is set: then it fails. The server runs
token-less on a free port of 127.0.0.1, in a temporary folder with its own Jupyter config, data,
settings and workspaces (a developer's own settings and kernels play no part), with this
checkout's kvlib first on PYTHONPATH; it is shut down, kernels first, when the test ends. A
screenshot of the end goes to .artifacts/screens/live-<chapter>.png.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from test_browser import SCREENS, launched_chromium, unavailable

ROOT = Path(__file__).resolve().parents[1]
# Chapter 2 shows both widgets; KVLIB_LIVE_NOTEBOOK=NN_name runs a whole chapter instead.
CHAPTER = os.environ.get("KVLIB_LIVE_NOTEBOOK", "02_kv_cache")
WHOLE = "KVLIB_LIVE_NOTEBOOK" in os.environ
JUPYTER = Path(sys.executable).parent / "jupyter"  # as book/running.md says: jupyter lab DIR
# JupyterLab settings for the test's own profile: every cell in the page (no virtual scrolling,
# so every prompt can be read), the notebook's kernel started without asking, and no news or
# update checks (offline, no toasts over the page).
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none", "autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def widget_cells(cells: list[dict]) -> list[dict]:
    """The chapter's code cells that a reader runs to get its widgets, verbatim: the setup (up to
    the cell that loads the model) and each cell that imports from kvlib.widgets, with the cell
    after it (the one that shows the widget)."""
    code = [c for c in cells if c["cell_type"] == "code"]
    src = ["".join(c["source"]) for c in code]
    keep = set(range(next(i for i, s in enumerate(src) if "load_model(" in s) + 1))
    for i, s in enumerate(src):
        if "from kvlib.widgets import" in s:
            keep |= {i, i + 1}
    return [code[i] for i in sorted(keep) if i < len(code)]


def copy_chapter(src: Path, dest: Path, whole: bool) -> None:
    """A copy of the chapter (or of its widget cells) without the saved outputs and widget state
    (as Edit > Clear Outputs of All Cells leaves it), so every prompt and widget on the page
    comes from this run."""
    nb = json.loads(src.read_text())
    nb["metadata"].pop("widgets", None)
    if not whole:
        nb["cells"] = widget_cells(nb["cells"])
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    dest.write_text(json.dumps(nb, indent=1))


def lab_env(home: Path) -> dict[str, str]:
    """The server's environment: this checkout's kvlib first, the tokenizer files (conftest sets
    TIKTOKEN_CACHE_DIR offline), and Jupyter folders of its own."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # One thread for the kernel's torch: other jobs on a shared machine slow one thread in
    # proportion, but can stall two threads that spin-wait on each other.
    env.setdefault("OMP_NUM_THREADS", "1")
    for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")]:
        env[var] = str(home / sub)
    for name, values in SETTINGS.items():
        path = home / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    return env


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:  # a busy machine answers slowly
        return json.load(r)


def wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            get_json(f"{url}/api/status")
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def stop_server(url: str, proc: subprocess.Popen) -> None:
    """Shut the kernels down through the API, then the server (SIGTERM, then SIGKILL)."""
    try:
        for kernel in get_json(f"{url}/api/kernels"):
            req = urllib.request.Request(f"{url}/api/kernels/{kernel['id']}", method="DELETE")
            urllib.request.urlopen(req, timeout=10).close()
    except OSError:
        pass
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A token-less JupyterLab on a free local port, serving a folder with a copy of CHAPTER."""
    if not (JUPYTER.parent / "jupyter-lab").is_file():
        unavailable(f"JupyterLab is not installed beside {sys.executable}: "
                    "pip install -r requirements.txt")
    home = tmp_path_factory.mktemp("lab")
    (home / "root").mkdir()
    copy_chapter(ROOT / "notebooks" / f"{CHAPTER}.ipynb", home / "root" / f"{CHAPTER}.ipynb",
                 WHOLE)
    port, log = free_port(), home / "server.log"
    cmd = [str(JUPYTER), "lab", str(home / "root"), "--no-browser", "--ip=127.0.0.1",
           f"--port={port}", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
           "--LabApp.news_url=None"]
    if os.geteuid() == 0:  # CI containers run as root; jupyter refuses that without the flag
        cmd.append("--allow-root")
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=lab_env(home), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        wait_for_server(url, proc, log)
        yield url
    finally:
        stop_server(url, proc)


@pytest.fixture(scope="module")
def chromium():
    with launched_chromium() as b:
        yield b


# Every code cell's prompt reads [n]: once Run All is through; a traceback ends the wait early.
RAN_ALL = """() => {
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
        .map(p => p.textContent.trim());
    const idle = document.querySelector('.jp-Notebook-ExecutionIndicator')
        ?.getAttribute('data-status') === 'idle';
    const failed = [...document.querySelectorAll('.jp-OutputArea-output')]
        .some(o => o.textContent.includes('Traceback'));
    return idle && prompts.length > 0 && (failed || prompts.every(t => /^\\[\\d+\\]:$/.test(t)));
}"""


def wait_for_kernel(page, url: str, timeout: float = 180) -> None:
    """Wait until the chapter's kernel is up and idle, answering a Select Kernel dialog (it
    appears when the kernel list arrives late) with the preferred kernel."""
    page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell", timeout=90_000)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        accept = page.locator(".jp-Dialog .jp-mod-accept")
        if accept.count():
            accept.first.click()
        states = [s["kernel"]["execution_state"] for s in get_json(f"{url}/api/sessions")]
        if "idle" in states and page.locator(
                ".jp-Notebook-ExecutionIndicator[data-status='idle']").count():
            return
        page.wait_for_timeout(500)
    pytest.fail(f"the chapter's kernel was not idle within {timeout} s")


def run_all_cells(page) -> None:
    """Run > Run All Cells, then wait until every cell has run (or one raised)."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$"))
    page.locator(".lm-Menu-item", has=label).click()
    page.wait_for_function(RAN_ALL, timeout=300_000, polling=500)
    tracebacks = [o.inner_text() for o in page.locator(".jp-OutputArea-output").all()
                  if "Traceback" in o.inner_text()]
    assert tracebacks == [], f"{CHAPTER} raised in JupyterLab:\n{tracebacks[0][-3000:]}"


def explorer_frame(explorer) -> bytes:
    """Pixels of the frame the explorer shows, once it has loaded."""
    img = explorer.locator("img").first
    img.wait_for(state="visible", timeout=10_000)
    explorer.page.wait_for_function("el => el.complete && el.naturalWidth > 0",
                                    arg=img.element_handle(), timeout=10_000)
    return img.screenshot()


def press_play(page) -> None:
    """Play advances the explorer's step counter with the kernel running; the picture follows."""
    explorer = page.locator(".kvlib-explorer").first
    explorer.scroll_into_view_if_needed()
    readout = explorer.locator(".widget-readout").first
    start, before = int(readout.inner_text()), explorer_frame(explorer)
    explorer.locator("button").first.click()  # Play
    page.wait_for_function("([el, v]) => parseInt(el.innerText) >= v + 2",
                           arg=[readout.element_handle(), start], timeout=20_000)
    explorer.locator("button").first.click()  # pause
    page.wait_for_timeout(500)
    assert int(readout.inner_text()) > start
    assert explorer_frame(explorer) != before, "Play moved the step but not the picture"


# Set when the monitor's summary says it is running: the Run press reached the kernel.
WATCH_RUNNING = """el => {
    window.kvlibSawRunning = false;
    new MutationObserver(() => {
        if (el.innerText.includes('running')) window.kvlibSawRunning = true;
    }).observe(el, {subtree: true, childList: true, characterData: true});
}"""
# The run is over: Run is enabled again and the table holds a row per ticked strategy, anew.
RUN_DONE = """([el, before, n]) => {
    const run = [...el.querySelectorAll('button')].find(b => b.innerText.trim() === 'Run');
    const table = el.querySelector('table');
    return window.kvlibSawRunning && run && !run.disabled && table &&
        table.querySelectorAll('tr').length === n + 1 && table.innerText !== before;
}"""


def lower_tokens(page, monitor) -> int:
    """Move the monitor's tokens slider to its minimum (Home key) and return the value: a
    shorter run, and a check that the kernel reads what the browser set."""
    readout = monitor.locator(".widget-readout").first
    start = int(readout.inner_text())
    monitor.locator(".noUi-handle").first.focus()
    page.keyboard.press("Home")
    page.wait_for_function("([el, v]) => parseInt(el.innerText) < v",
                           arg=[readout.element_handle(), start], timeout=10_000)
    return int(readout.inner_text())


def press_run(page) -> None:
    """Run measures in the kernel: the summary says running, then its table fills again, one row
    per ticked strategy with as many tokens as the slider says."""
    monitor = page.locator(".kvlib-latency").first
    monitor.scroll_into_view_if_needed()
    ticked = monitor.locator("input[type='checkbox']:checked").count()
    assert ticked > 0, "the latency monitor has no strategy ticked"
    tokens = lower_tokens(page, monitor)
    table = monitor.locator("table")
    before = table.first.inner_text() if table.count() else ""
    page.evaluate(WATCH_RUNNING, monitor.element_handle())
    monitor.locator("button", has_text=re.compile(r"^\s*Run\s*$")).click()
    page.wait_for_function(RUN_DONE, arg=[monitor.element_handle(), before, ticked],
                           timeout=180_000, polling=250)
    rows = [r.locator("td").all_inner_texts() for r in table.first.locator("tr").all()[1:]]
    assert all(int(r[1]) == tokens and re.fullmatch(r"\d+\.\d", r[-1]) for r in rows), rows


def test_chapter_widgets_live_in_jupyterlab(lab, chromium):
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else 0)
    page.on("request", lambda r: outside.append(r.url)
            if urlparse(r.url).scheme in ("http", "https")
            and urlparse(r.url).hostname not in ("127.0.0.1", "localhost") else 0)
    laps: dict[str, float] = {}  # seconds per phase, printed for a failure's report
    start = time.monotonic()

    def lap(name: str) -> None:
        laps[name] = round(time.monotonic() - start - sum(laps.values()), 1)

    try:
        page.goto(f"{lab}/lab/tree/{CHAPTER}.ipynb", wait_until="load", timeout=60_000)
        lap("page")
        wait_for_kernel(page, lab)
        lap("kernel")
        run_all_cells(page)
        lap("run all")
        assert page.locator(".kvlib-explorer").count() > 0, f"{CHAPTER} shows no cache explorer"
        press_play(page)
        lap("play")
        if page.locator(".kvlib-latency").count():
            press_run(page)
            lap("run")
        elif CHAPTER == "02_kv_cache":
            pytest.fail("chapter 2 shows no latency monitor")
    finally:
        print(f"{CHAPTER} in JupyterLab, seconds per phase: {laps}")
        SCREENS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENS / f"live-{CHAPTER}.png"))
        page.close()
    assert outside == [], f"JupyterLab reached outside localhost: {outside}"
    assert errors == [], f"JupyterLab's page logged errors: {errors}"
