"""``lmzoo download`` and Hub ids wherever a command takes a model, offline: the Hub cache of
tests/hub_cache.py (tiny models saved by transformers and PEFT) read with HF_HUB_OFFLINE=1."""

import os
import subprocess
import sys

from lmzoo.cli.main import main
from tests.hub_cache import DEV, MAIN


def _snapshot(hub, commit=MAIN):
    return hub.cache / "models--org--name" / "snapshots" / commit


def _one_line_error(err: str, command: str) -> str:
    assert err.startswith(f"lmzoo {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_download_prints_the_snapshot(offline_hub, capsys):
    assert main(["download", "org/name"]) == 0
    assert capsys.readouterr().out == f"{_snapshot(offline_hub)}\n"
    assert main(["download", "org/name", "--revision", "dev", "--include", "*.md"]) == 0
    assert capsys.readouterr().out == f"{_snapshot(offline_hub, DEV)}\n"


def test_download_of_a_missing_id_or_revision_is_one_line(offline_hub, capsys):
    assert main(["download", "org/missing"]) == 1
    err = _one_line_error(capsys.readouterr().err, "download")
    assert "'org/missing' is not in the local Hub cache" in err and "HF_HUB_OFFLINE is set" in err
    assert main(["download", "org/name", "--revision", "v9"]) == 1
    err = _one_line_error(capsys.readouterr().err, "download")
    assert "is in the local Hub cache" in err and "but not at revision 'v9'" in err and "HF_HUB_OFFLINE" in err


def test_download_in_a_fresh_process_reads_the_environment(offline_hub):
    """HF_HOME and HF_HUB_OFFLINE=1 as a user sets them (huggingface_hub reads them when imported)."""
    env = {**os.environ, "HF_HOME": str(offline_hub.home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE")  # HF_HOME/hub, as huggingface_hub derives it
    r = subprocess.run([sys.executable, "-m", "lmzoo.cli.main", "download", "org/missing"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert f"is not in the local Hub cache ({offline_hub.home / 'hub'}) and HF_HUB_OFFLINE is set" in \
        _one_line_error(r.stderr, "download")


def _generate(capsys, model: str, *flags: str) -> tuple[str, str]:
    assert main(["generate", "--model", model, "--prompt", "hello 床前", "--max-new-tokens", "6", *flags]) == 0
    out = capsys.readouterr()
    assert out.out.strip()  # (text, for a comparison that is not of two empty strings)
    return out.out, out.err


def test_generate_by_hub_id_is_the_directory_s_model(offline_hub, capsys):
    """The snapshot's weights and its tokenizer: the same text as from the directory that was cached."""
    by_id, note = _generate(capsys, "org/name")
    assert by_id == _generate(capsys, str(offline_hub.source["main"]))[0]
    assert f"note: 'org/name' is a Hub id: {_snapshot(offline_hub)} (revision main)" in note


def test_generate_with_a_revision(offline_hub, capsys):
    dev, note = _generate(capsys, "org/name", "--revision", "dev")
    assert dev == _generate(capsys, str(offline_hub.source["dev"]))[0] != _generate(capsys, "org/name")[0]
    assert f"{_snapshot(offline_hub, DEV)} (revision dev)" in note
    assert main(["generate", "--model", "org/name", "--revision", "v9", "--ids", "1"]) == 1
    err = _one_line_error(capsys.readouterr().err, "generate")
    assert "--model 'org/name' is neither a directory nor a preset, and as a Hub id it is in the local Hub cache" in err
    assert "not at revision 'v9'" in err


def test_generate_errors_name_every_place_looked(offline_hub, tmp_path, capsys):
    assert main(["generate", "--model", "org/missing", "--ids", "1"]) == 1
    err = _one_line_error(capsys.readouterr().err, "generate")
    assert ("--model 'org/missing' is neither a directory nor a preset, and as a Hub id it is not in the local Hub "
            f"cache ({offline_hub.cache}) and HF_HUB_OFFLINE is set") in err
    assert main(["generate", "--model", "runs/x/final", "--ids", "1"]) == 1  # no Hub id either
    assert "is neither a directory nor a preset, nor a Hub id" in _one_line_error(capsys.readouterr().err, "generate")
    assert main(["generate", "--model", "gpt2", "--revision", "dev", "--ids", "1"]) == 1  # a preset comes first
    assert "--revision dev applies to a Hub id, and --model 'gpt2' is a preset" in capsys.readouterr().err


def test_a_local_directory_named_like_the_id_comes_first(offline_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    os.symlink(offline_hub.source["dev"], tmp_path / "org" / "name")
    local, note = _generate(capsys, "org/name")
    assert local == _generate(capsys, str(offline_hub.source["dev"]))[0] != _generate(capsys, str(_snapshot(offline_hub)))[0]
    assert "note: 'org/name' is a local directory, read instead of the Hub id of that name" in note


def test_eval_with_a_model_and_an_adapter_by_hub_id(offline_hub, tmp_path, capsys):
    """--adapter org/adapter: PEFT's adapter from the cache; the numbers are those of the directories."""
    import json

    text = tmp_path / "t.txt"
    text.write_text("hello world, hello lmzoo. 床前明月光，疑是地上霜。" * 3)

    def loss(*argv):
        assert main(["eval", *argv, "--data", str(text), "--json", "--no-progress"]) == 0
        res = json.loads(capsys.readouterr().out)["models"][0]
        return res["model"], res["text"][str(text)]["loss"]

    name, by_id = loss("--model", "org/name", "--adapter", "org/adapter")
    assert name == "org/name+org/adapter"
    assert by_id == loss("--model", str(offline_hub.source["main"]), "--adapter", str(offline_hub.source["adapter"]))[1]
    assert abs(by_id - loss("--model", "org/name")[1]) > 1e-3  # the adapter was put on


MISSING = "org/missing"
WHERE = [  # every command and flag that names a model, each given the missing id (DIR: the cached model's folder)
    (["generate", "--model", MISSING, "--ids", "1"], "--model"),
    (["generate", "--model", "DIR", "--draft", MISSING, "--ids", "1"], "--draft"),
    (["chat", "--model", MISSING, "--prompt", "hi"], "--model"),
    (["convert", "--model", MISSING, "--out", "OUT"], "--model"),
    (["export", "gguf", "--model", MISSING, "--out", "OUT"], "--model"),
    (["kvcache", "--model", MISSING, "--tokens", "8"], "--model"),
    (["quantize", "--model", MISSING, "--out", "OUT"], "--model"),
    (["serve", "--model", MISSING], "--model"),
    (["sft", "--model", MISSING, "--out", "OUT"], "--model"),
    (["reward", "--model", MISSING, "--out", "OUT"], "--model"),
    (["dpo", "--model", "DIR", "--ref", MISSING, "--out", "OUT"], "--ref"),
    (["ppo", "--model", "DIR", "--reward", MISSING, "--out", "OUT"], "--reward"),
    (["grpo", "--model", MISSING, "--out", "OUT"], "--model"),
    (["grpo", "--model", "DIR", "--reward", MISSING, "--out", "OUT"], "--reward"),
    (["eval", "--model", MISSING], "--model"),
    (["eval", "--model", "DIR", "--adapter", MISSING], "--adapter"),
    (["eval", "--compare", "DIR", MISSING], "--compare"),
]


def test_every_flag_that_names_a_model_takes_a_hub_id(offline_hub, tmp_path, capsys):
    """Resolved before the command runs (lmzoo.cli.common.resolve_names): the missing id is the one error."""
    for argv, flag in WHERE:
        argv = [str(offline_hub.source["main"]) if a == "DIR" else str(tmp_path / "out") if a == "OUT" else a
                for a in argv]
        assert main(argv) == 1, argv
        err = _one_line_error(capsys.readouterr().err, argv[0])
        assert f"{flag} '{MISSING}' is " in err and "as a Hub id it is not in the local Hub cache" in err, err
    assert not (tmp_path / "out").exists()
