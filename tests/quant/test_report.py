"""The report's child processes: a child that dies names its signal (or exit status) and the end of
its stderr, never an empty reason; skipped variants are listed with their reason under the table."""

import sys

import pytest

from lmzoo.errors import LmzooError
from lmzoo.quant.report import exit_reason, run_child, stderr_summary, table

SELF_KILL = ("import os, signal, sys; print('about to crash', file=sys.stderr, flush=True); "
             "os.kill(os.getpid(), signal.SIGSEGV)")


def test_a_child_killed_by_a_signal_names_it_and_its_stderr():
    with pytest.raises(LmzooError) as e:
        run_child([sys.executable, "-c", SELF_KILL], "measuring model-x")
    msg = str(e.value)
    assert msg == "measuring model-x failed: killed by signal 11 (SIGSEGV); stderr: about to crash"


def test_a_crash_under_faulthandler_reports_the_python_line():
    # what `measure` runs: -X faulthandler prints the Python stack of a segfault on stderr
    with pytest.raises(LmzooError, match=r"killed by signal 11 \(SIGSEGV\); stderr: Fatal Python error: "
                                         r"Segmentation fault .*line 1"):
        run_child([sys.executable, "-X", "faulthandler", "-c", "import ctypes; ctypes.string_at(0)"], "measuring m")


def test_a_child_that_raises_reports_its_status_and_the_exception():
    with pytest.raises(LmzooError) as e:
        run_child([sys.executable, "-c", "raise ValueError('boom')"], "measuring m")
    assert str(e.value).startswith("measuring m failed: exited with status 1; stderr: ")
    assert str(e.value).endswith("ValueError: boom") and "\n" not in str(e.value)


def test_exit_reasons_and_empty_stderr():
    assert exit_reason(2) == "exited with status 2"
    assert exit_reason(-9) == "killed by signal 9 (SIGKILL)"
    assert stderr_summary("\n  \n") == "(empty)"
    assert run_child([sys.executable, "-c", "print(42)"], "x").strip() == "42"


def test_table_lists_skipped_variants_with_their_reason():
    rows = [{"name": "float32", "perplexity": 10.0, "ppl_change": 0.0},
            {"name": "awq-w4g48", "skipped": "quantize: method 'awq' supports group_size ..."}]
    md = table(rows)
    assert md.splitlines()[2] == "| float32 | 10.000 | +0.00% |"
    assert md.endswith("Skipped:\n- awq-w4g48: quantize: method 'awq' supports group_size ...")
    assert "| awq-w4g48 |" not in md
