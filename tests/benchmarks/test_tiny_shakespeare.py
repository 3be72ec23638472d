"""The Tiny Shakespeare benchmarks say how to point them at the corpus when it is not where they looked."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv", [["bench_quant.py"], ["tiny_shakespeare.py", "--out", "run"]])
def test_a_missing_corpus_names_the_variable_that_sets_it(argv, tmp_path):
    env = dict(os.environ, LMZOO_SHARED_DATA=str(tmp_path / "elsewhere"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:]], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    want = tmp_path / "elsewhere" / "corpora" / "en" / "tinyshakespeare.txt"
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip() == (f"corpus not found: {want}; set LMZOO_SHARED_DATA=/path/to/data, the folder "
                                   "that holds corpora/en/tinyshakespeare.txt")
