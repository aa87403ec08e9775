"""_ext/offline_js.py: a plain `jupyter-book build .` fetches the offline JavaScript or stops at
once with a message naming `make book`."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from sphinx.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "_ext"))
import offline_js  # noqa: E402


def test_missing_files_and_no_way_to_fetch_them_name_make_book(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "fetch_widget_js.sh").write_text("echo 'npm is needed' >&2; exit 1\n")
    with pytest.raises(ConfigError, match=r"(?s)widgets/require.js.*npm is needed.*`make book`"):
        offline_js.ensure_offline_js(SimpleNamespace(srcdir=str(tmp_path)), None)


def test_present_files_need_nothing(tmp_path):
    for f in offline_js.NEEDED:
        (tmp_path / "_offline" / "_static" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "_offline" / "_static" / f).write_text("//")
    offline_js.ensure_offline_js(SimpleNamespace(srcdir=str(tmp_path)), None)  # no script needed
