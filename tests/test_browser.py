"""The built book in a real browser: headless Chromium renders the saved widgets without a kernel
and without a CDN, and the cache explorer's slider changes the picture.

Needs the built book (``make book``; or KVLIB_BOOK_HTML=... for another build, with
KVLIB_BOOK_PAGES=a.html,b.html for its pages), Python's ``playwright`` and a Chromium binary
(/usr/bin/chromium, or set CHROMIUM=/path/to/chrome). Never runs ``playwright install``. Skips
when the book or the browser is missing, unless CI is set: then it fails. Screenshots of every
page go to .artifacts/screens/ (gitignored).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = Path(os.environ.get("KVLIB_BOOK_HTML", ROOT / "_build" / "html"))
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))  # every chapter
PAGES = [p for p in os.environ.get("KVLIB_BOOK_PAGES", "").split(",") if p] or [
    f"notebooks/{c}.html" for c in CHAPTERS]
SCREENS = ROOT / ".artifacts" / "screens"
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--disable-extensions"]


# Messages of the book's theme stack, not of the widgets; each is explained, anything else fails.
KNOWN_ERRORS = [
    # Sphinx 7.4 writes inline scripts that extensions add after the builder starts twice
    # (sphinx-thebe's `const THEBE_JS_URL = ...`); the first copy stays in force.
    "Identifier 'THEBE_JS_URL' has already been declared",
    # pydata-sphinx-theme logs this with console.error on a first visit (no saved light/dark).
    "Got invalid theme mode: . Resetting to auto.",
]


def unavailable(reason: str):
    """Skip on a developer's machine; fail in CI, where the book and browser must be there."""
    if IN_CI:
        pytest.fail(f"CI is set but {reason}", pytrace=False)
    pytest.skip(reason)


def chromium_path() -> str | None:
    candidates = [os.environ.get("CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                  shutil.which("chromium"), shutil.which("chromium-browser"),
                  shutil.which("google-chrome"), "/usr/bin/google-chrome"]
    return next((c for c in candidates if c and Path(c).is_file()), None)


@pytest.fixture(scope="module")
def server():
    missing = [p for p in PAGES if not (BOOK / p).is_file()]
    if missing:
        unavailable(f"the built book lacks {', '.join(missing)} under {BOOK}: run `make book` "
                    "(or set KVLIB_BOOK_HTML / KVLIB_BOOK_PAGES)")
    handler = functools.partial(_QuietHandler, directory=str(BOOK))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def launched_chromium() -> Iterator:
    """Headless Chromium through playwright, or a skip (a failure under CI) naming what is
    missing; closed on exit. tests/test_live.py launches it the same way."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Python's playwright is not installed: pip install playwright")
    exe = chromium_path()
    if exe is None:
        unavailable("no Chromium found: apt-get install chromium, or set CHROMIUM=/path")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def browser(server):
    with launched_chromium() as b:
        yield b


def widget_state(page) -> dict:
    """Counts of saved widget views and of the areas the widget manager rendered."""
    return page.evaluate("""() => {
        const views = document.querySelectorAll(
            'script[type="application/vnd.jupyter.widget-view+json"]');
        const areas = [...document.querySelectorAll('.widget-subarea')];
        return {views: views.length, areas: areas.length,
                empty: areas.filter(a => a.offsetHeight < 20 || !a.firstElementChild).length,
                images: [...document.querySelectorAll('.widget-subarea img')]
                    .filter(i => i.naturalWidth > 0).length};
    }""")


@pytest.mark.parametrize("page_name", PAGES)
def test_page_renders_widgets_offline(browser, server, page_name):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests, errors, failed = [], [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else 0)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: failed.append(f"{r.url} ({r.failure})"))
    page.on("response", lambda r: failed.append(f"{r.url} (HTTP {r.status})")
            if r.status >= 400 and not r.url.endswith("/favicon.ico") else 0)
    try:
        page.goto(f"{server}/{page_name}", wait_until="load")
        n_views = widget_state(page)["views"]
        if n_views:  # the widget manager replaces each saved view with a rendered area
            page.wait_for_function(
                """n => document.querySelectorAll('.widget-subarea').length >= n &&
                       [...document.querySelectorAll('.widget-subarea')]
                           .every(a => a.offsetHeight >= 20)""", arg=n_views, timeout=30_000)
        state = widget_state(page)
        explorers = page.locator(".kvlib-explorer")
        changed = [slide_explorer(page, explorers.nth(i)) for i in range(explorers.count())]
        page.wait_for_load_state("networkidle")
        page.evaluate("() => { document.activeElement?.blur(); window.scrollTo(0, 0); }")
        SCREENS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENS / (Path(page_name).stem + ".png")), full_page=True)
    finally:
        page.close()
    outside = [u for u in requests
               if urlparse(u).scheme not in ("data", "blob")
               and urlparse(u).hostname not in ("127.0.0.1", "localhost")]
    assert outside == [], f"{page_name} reached outside localhost: {outside}"
    errors = [e for e in errors if e not in KNOWN_ERRORS
              and not ("Failed to load resource" in e and failed == [])]  # favicon.ico
    assert errors == [], f"{page_name} logged JavaScript errors: {errors}"
    assert failed == [], f"{page_name} had failed requests: {failed}"
    assert state["areas"] >= state["views"] and state["empty"] == 0, state
    if "kvlib-explorer" in (BOOK / page_name).read_text():
        assert changed, f"{page_name} has a cache explorer in its state but none was rendered"
    assert all(changed), f"moving the explorer's slider did not change the picture on {page_name}"


def shown_frame(explorer) -> bytes:
    """Pixels of the frame the explorer shows (a Stack renders only its selected child)."""
    return explorer.locator("img").first.screenshot()


def slide_explorer(page, explorer) -> bool:
    """Move the explorer's step slider with the keyboard, press Play, then pick another strategy;
    True if the slider and the menu changed the picture."""
    explorer.scroll_into_view_if_needed()
    before = shown_frame(explorer)
    handle = explorer.locator(".noUi-handle, .ui-slider-handle").first
    readout = explorer.locator(".widget-readout").first
    start = readout.inner_text()
    handle.focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.wait_for_function("([el, v]) => el.innerText !== v",
                           arg=[readout.element_handle(), start], timeout=5_000)
    page.wait_for_timeout(300)
    after = shown_frame(explorer)
    moved = readout.inner_text() != start and before != after
    # Play runs in the browser too: the step advances by itself.
    at = readout.inner_text()
    explorer.locator("button").first.click()
    page.wait_for_function("([el, v]) => el.innerText !== v",
                           arg=[readout.element_handle(), at], timeout=5_000)
    explorer.locator("button").first.click()  # pause
    after = shown_frame(explorer)
    select = explorer.locator("select").first
    options = select.locator("option").all_inner_texts()
    if len(options) < 2:
        return moved
    select.select_option(index=1)
    page.wait_for_timeout(300)
    return moved and shown_frame(explorer) != after
