"""Where the shared real-world data lives (``../shared/data`` beside the project, see its README).

``LMZOO_SHARED_DATA=/path/to/data`` points the tests at a copy elsewhere. ``LMZOO_REQUIRE_SHARED_DATA=1``
(set by ``.ci/run``, where the folder is present) turns "absent" from a skip into a test failure, so a
moved folder cannot silently drop the tests that read real files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMZOO_SHARED_DATA") or ROOT.parent / "shared" / "data")
REQUIRED = os.environ.get("LMZOO_REQUIRE_SHARED_DATA", "") not in ("", "0")


def need(path: Path) -> Path:
    """``path`` (under ``DATA``) if it exists; else skip, or fail when the data is required."""
    if not path.exists():
        msg = (f"{path} is absent (the shared real-data folder {DATA} is not there; set LMZOO_SHARED_DATA "
               f"to a copy of it)")
        if REQUIRED:
            pytest.fail(msg + " and LMZOO_REQUIRE_SHARED_DATA is set", pytrace=False)
        pytest.skip(msg)
    return path

# The prebuilt llama-cpp-python wheels beside the project (../shared/wheels, its README); make installs one.
WHEELS = DATA.parent / "wheels"


def need_llamacpp():
    """``lmzoo.interop.llamacpp`` when llama.cpp can be imported in a child process; else skip, or fail where
    the prebuilt wheels are (``make`` installs one from them) or the shared data is required."""
    from lmzoo.interop import llamacpp

    ok, why = llamacpp.available()
    if not ok:
        if WHEELS.exists() or REQUIRED:
            pytest.fail(f"{why}; {WHEELS} is there (or LMZOO_REQUIRE_SHARED_DATA is set), so llama-cpp-python "
                        "should be installed from it (make test does)", pytrace=False)
        pytest.skip(why)
    return llamacpp
