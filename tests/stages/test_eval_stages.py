"""`lmzoo eval --compare` on real stage outputs: the session's pretrained base and its SFT model
(tests/stages/conftest.py), measured alike; SFT must show on the task it trained for."""

import json

from lmzoo.cli.main import main


def test_eval_compare_shows_what_sft_did(pretrained_base, sft_sorting, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--compare", str(pretrained_base), str(sft_sorting.final_dir), "--tasks", "sort",
                 "--limit", "60", "--max-new-tokens", "12", "--no-progress", "--out", str(out)]) == 0
    base, sft = json.loads((out / "results.json").read_text())["models"]
    # the base has no chat template and is asked in plain text; it never sorts (0 of 60)
    assert base["tasks"]["sort"]["exact_match"] <= 0.05
    # SFT's own held-out accuracy on easy sorting was about 0.38 on AVX-512 CPUs and 0.13 on an AVX2 Zen 3 (the
    # 250-step run is mid-climb, where float summation order moves the trajectory); these tasks are drawn alike
    assert sft["tasks"]["sort"]["exact_match"] >= 0.1 and sft_sorting.accuracy_after >= 0.1
    assert abs(sft["tasks"]["sort"]["exact_match"] - sft_sorting.accuracy_after) < 0.2
    assert "sort exact_match" in capsys.readouterr().out
