"""Every shipped command runs on a tiny setting, and bad input gets a clear message."""

import json
import subprocess
import sys

import pytest
import torch

import lmzoo
from lmzoo.cli.main import COMMANDS, main
from lmzoo.models.registry import families


def test_every_command_has_help(capsys):
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: lmzoo " + cmd in capsys.readouterr().out


def test_zoo_lists_every_family_from_the_registry(capsys):
    assert main(["zoo", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["family"] for r in rows} == set(families())
    by = {r["preset"]: r for r in rows}
    # KV bytes/token in bf16 = 2 · n_kv · d_head · layers · 2 bytes
    assert by["llama2-7b"]["kv_bytes_per_token"] == 2 * 32 * 128 * 32 * 2
    assert by["llama2-70b"]["kv_bytes_per_token"] == 2 * 8 * 128 * 80 * 2
    assert by["llama2-70b"]["attention"].startswith("GQA-8")
    # GQA-G counts the G K/V groups (the GQA paper; lmzoo kvcache's "GQA (8 groups)"), not query heads per group
    assert by["llama3-8b"]["attention"] == "GQA-8 (32q/8kv)" and by["chatglm2-6b"]["attention"] == "GQA-2 (32q/2kv)"


def test_one_main_job_and_no_demo_command(capsys):
    """`make demo` runs `lmzoo speedrun`; the old random-weights `lmzoo demo` (whose table is `lmzoo zoo`) is gone."""
    assert "demo" not in COMMANDS and COMMANDS[0] == "speedrun"
    with pytest.raises(SystemExit) as e:
        main(["demo"])
    assert e.value.code == 2 and "invalid choice: 'demo'" in capsys.readouterr().err
    for cmd in COMMANDS:  # the help texts name the architecture table, not "the seed notes"
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "seed notes" not in capsys.readouterr().out


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"lmzoo {version('lmzoo')}\n" == f"lmzoo {lmzoo.__version__}\n"


def test_convert_then_generate(tmp_path, capsys):
    from lmzoo.models.llama.config import LlamaConfig

    torch.manual_seed(0)
    model = lmzoo.build(LlamaConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, d_ff=48, max_positions=32))
    lmzoo.save(model, tmp_path / "src")
    assert main(["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0
    assert lmzoo.load(tmp_path / "bf").embed.weight.dtype == torch.bfloat16
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "src"), "--ids", "1 2 3", "--max-new-tokens", "5"]) == 0
    got = [int(t) for t in capsys.readouterr().out.split()]
    ref = lmzoo.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5)[0, 3:].tolist()
    assert got == ref


def test_bad_input_messages(tmp_path, capsys):
    assert main(["generate", "--model", "no-such-model", "--ids", "1"]) == 1
    assert "neither a directory nor a preset" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--ids", "1"]) == 1
    assert "config.json" in capsys.readouterr().err


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "lmzoo.cli.main", "zoo", "--family", "llama"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "llama2-70b" in r.stdout


def test_generate_with_text_prompt_and_tokenizer_json(tmp_path, capsys):
    """--prompt goes through the directory's tokenizer.json; Chinese text included."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    from lmzoo.models.llama.config import LlamaConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["床前明月光，疑是地上霜。", "hello world, hello lmzoo"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    model = lmzoo.build(LlamaConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=1, n_heads=4, d_ff=48,
                                    max_positions=64))
    path = lmzoo.save(model, tmp_path / "m")
    tok.save(str(path / "tokenizer.json"))
    assert main(["generate", "--model", str(path), "--prompt", "床前明月光", "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    ids = tok.encode("床前明月光").ids
    ref = lmzoo.generate(model, torch.tensor([ids]), max_new_tokens=6)[0, len(ids):].tolist()
    assert text.rstrip("\n") == tok.decode(ref)
    assert main(["generate", "--model", "gpt2", "--prompt", "hi"]) == 1  # a preset has no tokenizer
    assert "--ids" in capsys.readouterr().err


# -- issue 11: bad input is refused before anything is built ---------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
    (["--do-sample", "--temperature", "0"], "--temperature must be > 0, got 0.0"),
    (["--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["--top-k", "0"], "--top-k must be a positive integer, got 0"),
])
def test_generate_checks_settings_before_loading(flags, message, capsys, monkeypatch):
    import lmzoo.cli.generate as gen

    monkeypatch.setattr(gen, "resolve_model", lambda *a, **k: pytest.fail("the model was built"))
    assert main(["generate", "--model", "llama2-7b", "--ids", "1 2", *flags]) == 1
    assert capsys.readouterr().err == f"lmzoo generate: error: {message}\n"


@pytest.mark.parametrize("argv, what", [
    (["generate", "--model", "vit-base-patch16-224", "--ids", "1"], "a vit encoder"),
    (["generate", "--model", "clip-vit-base-patch32", "--ids", "1"], "a clip dual encoder"),
    (["generate", "--model", "bert-base-uncased", "--ids", "1"], "a bert encoder"),
    (["kvcache", "--model", "clip-vit-base-patch32", "--tokens", "4"], "a clip dual encoder"),
    (["kvcache", "--model", "vit-base-patch16-224", "--tokens", "4"], "a vit encoder"),
])
def test_encoders_are_refused_as_not_decoders(argv, what, capsys, monkeypatch):
    import lmzoo.interop.checkpoint as ckpt

    real = ckpt.build
    monkeypatch.setattr(ckpt, "build", lambda c, **k: pytest.fail("built") if k.get("device") != "meta" else real(c, **k))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lmzoo {argv[0]}: error: '{argv[2]}' is {what}, not a decoder") and err.count("\n") == 1


def test_model_help_lists_only_the_presets_the_command_takes(capsys, monkeypatch):
    import re

    from lmzoo.models.registry import presets

    monkeypatch.setenv("COLUMNS", "100000")  # one line per option: no preset name wrapped at its hyphen
    listed = {}
    for cmd in ("generate", "chat", "convert"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        listed[cmd] = set(re.search(r"or a preset name \(([^)]*)\)", capsys.readouterr().out)[1].split(", "))
    encoders = {n for n, (fam, _) in presets().items() if fam.name in ("bert", "vit", "clip")}
    assert {"bert-base-uncased", "vit-base-patch16-224", "clip-vit-base-patch32"} <= encoders
    assert listed["convert"] == set(presets())  # convert writes any family
    for cmd in ("generate", "chat"):  # they refuse encoders (the test above), so they do not offer them
        assert listed[cmd] == set(presets()) - encoders and {"gpt2", "t5-small", "chatglm-6b"} <= listed[cmd]


def test_broken_pipe_exits_quietly():
    """`lmzoo zoo --json | head`: a reader that closes early gets no traceback, and the exit code is SIGPIPE's."""
    for argv in (["zoo", "--family", "llama", "--json"], ["kvcache", "--model", "gpt2", "--tokens", "8", "--no-measure"]):
        p = subprocess.Popen([sys.executable, "-m", "lmzoo", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()  # the reader is gone before the first byte is written
        err = p.stderr.read()
        assert p.wait(timeout=120) == 141, err
        assert err == b""


def test_zoo_unknown_family_is_an_error(capsys):
    assert main(["zoo", "--family", "lama"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("lmzoo zoo: error: unknown family 'lama'; known: "
                   "bert, bloom, chatglm, chatglm2, clip, deepseek_v2, gpt2, llama, t5, vit\n")


def test_memory_estimate_refuses_before_building(tmp_path, capsys, monkeypatch):
    import lmzoo.cli.common as common

    monkeypatch.setattr(common, "available_memory", lambda: 24 * 10**9)  # a 24 GB machine
    monkeypatch.setattr(lmzoo, "build", lambda *a, **k: pytest.fail("weights were materialised"))
    # LLaMA-2-7B: 6,738,415,616 parameters, initialised in float32 = 26.95 GB
    assert main(["generate", "--model", "llama2-7b", "--ids", "1 450 7483", "--max-new-tokens", "5"]) == 1
    err = capsys.readouterr().err
    assert "6.74B parameters × 4 bytes" in err and "about 27.0 GB" in err and "24.0 GB of memory available" in err
    assert "--skip-memory-check" in err and err.count("\n") == 1
    assert main(["convert", "--model", "llama2-7b", "--out", str(tmp_path / "o")]) == 1
    assert "about 27.0 GB" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # a checkpoint directory counts its safetensors bytes; the flag overrides the refusal
    monkeypatch.undo()
    from lmzoo.models.llama.config import LlamaConfig

    d = lmzoo.save(lmzoo.build(LlamaConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, d_ff=48,
                                           max_positions=32)), tmp_path / "m")
    stored = (d / "model.safetensors").stat().st_size
    assert common.estimate_bytes(str(d))[0] == stored
    monkeypatch.setattr(common, "available_memory", lambda: stored - 1)
    assert main(["generate", "--model", str(d), "--ids", "1 2", "--max-new-tokens", "2"]) == 1
    assert "this machine has 0.0 GB" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--ids", "1 2", "--max-new-tokens", "2", "--skip-memory-check"]) == 0


def test_available_memory_reads_the_machine():
    import lmzoo.cli.common as common

    got = common.available_memory()
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert abs(got - kb * 1024) < 2**30  # the same reading, give or take what changed in between


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, hello lmzoo", "the cat sat on the mat"] * 20,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_convert_carries_the_tokenizer_and_generation_files(tmp_path, capsys):
    from lmzoo.models.llama.config import LlamaConfig

    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    model = lmzoo.build(LlamaConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=1, n_heads=4, d_ff=48,
                                    max_positions=64))
    src = lmzoo.save(model, tmp_path / "src")
    tok.save(str(src / "tokenizer.json"))
    side = {"tokenizer_config.json": json.dumps({"eos_token": "</s>", "chat_template": "{{ messages }}"}),
            "generation_config.json": json.dumps({"max_new_tokens": 7}), "chat_template.jinja": "{{ x }}"}
    for name, text in side.items():
        (src / name).write_text(text)
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0
    assert "with chat_template.jinja, generation_config.json, tokenizer.json, tokenizer_config.json" in \
        capsys.readouterr().out
    for name in ["tokenizer.json", *side]:
        assert (tmp_path / "bf" / name).read_bytes() == (src / name).read_bytes(), name
    # lmzoo.save of a loaded model carries them too; tokenizer=False writes none
    loaded = lmzoo.load(src)
    assert (lmzoo.save(loaded, tmp_path / "again") / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert not (lmzoo.save(loaded, tmp_path / "bare", tokenizer=False) / "tokenizer.json").exists()
    # and --prompt works on the converted directory exactly as on the source
    outs = []
    for d in (src, tmp_path / "bf"):
        assert main(["generate", "--model", str(d), "--prompt", "hello", "--max-new-tokens", "4",
                     "--dtype", "bfloat16"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_save_writes_a_given_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from lmzoo.models.llama.config import LlamaConfig

    tok = _tiny_tokenizer()
    model = lmzoo.build(LlamaConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=1, n_heads=4, d_ff=48))
    ids = tok.encode("hello the mat").ids
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    out = lmzoo.save(model, tmp_path / "hf", tokenizer=hf)
    assert lmzoo.load_tokenizer(out).encode("hello the mat") == ids
    ours = lmzoo.load_tokenizer(out)
    out2 = lmzoo.save(model, tmp_path / "ours", tokenizer=ours)
    assert lmzoo.load_tokenizer(out2).encode("hello the mat") == ids and lmzoo.load_tokenizer(out2).eos_token == "</s>"
    with pytest.raises(lmzoo.LmzooError, match="no tokenizer or generation files"):
        lmzoo.save(model, tmp_path / "x", tokenizer=tmp_path / "hf" / "..")


def test_generate_prompt_stops_before_eos_and_skips_special_tokens(tmp_path, capsys):
    """The model's EOS ends the text: its '</s>' is not printed (nor any other special token)."""
    from lmzoo.cli.generate import TextStream
    from lmzoo.models.llama.config import LlamaConfig

    tok = _tiny_tokenizer()
    eos = tok.token_to_id("</s>")
    prompt = tok.encode("hello the").ids
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=1, n_heads=4, d_ff=48, max_positions=64)
    model = lmzoo.build(cfg).eval()
    g = lmzoo.generate(model, torch.tensor([prompt]), max_new_tokens=3)[0, len(prompt):].tolist()
    a = g[2]
    assert eos not in prompt + g and a not in prompt + g[:2]  # the relabelling below stays exact
    with torch.no_grad():  # swap ids a and </s>: the same model, which now says </s> as its third token
        for w in (model.embed.weight, model.lm_head.weight):
            w[[a, eos]] = w[[eos, a]]
    model.config.eos_token_id = eos
    d = lmzoo.save(model, tmp_path / "m")
    tok.save(str(d / "tokenizer.json"))
    assert main(["generate", "--model", str(d), "--prompt", "hello the", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out == tok.decode(g[:2]) + "\n" and "</s>" not in out
    bos = tok.token_to_id("<s>")
    s = TextStream(lmzoo.load_tokenizer(d))
    assert "".join(s.add(t) for t in [g[0], bos, g[1]]) + s.flush() == tok.decode([g[0], g[1]])


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch, capsys):
    import lmzoo.cli.zoo as zoo

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "rows", interrupted)
    assert main(["zoo"]) == 130
    assert capsys.readouterr().err == "lmzoo: interrupted\n"


def test_generate_with_speculative_decoding_prints_the_greedy_text(tmp_path, capsys):
    """--prompt-lookup and --draft (the model as its own draft) print exactly what plain greedy prints, and
    say how many drafted tokens were accepted."""
    from lmzoo.models.llama.config import LlamaConfig

    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    model = lmzoo.build(LlamaConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, d_ff=48,
                                    max_positions=64))
    d = lmzoo.save(model, tmp_path / "m")
    tok.save(str(d / "tokenizer.json"))
    base = ["generate", "--model", str(d), "--prompt", "hello the cat sat on the mat, hello the cat",
            "--max-new-tokens", "12"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    for extra in (["--prompt-lookup", "2"], ["--draft", str(d), "--draft-k", "3"]):
        assert main(base + extra) == 0
        got = capsys.readouterr()
        assert got.out == plain and "drafted tokens accepted" in got.err, extra
    assert "(100%)" in got.err  # its own draft always agrees
    assert main(base + ["--prompt-lookup", "0"]) != 0
    assert "--prompt-lookup must be at least 1" in capsys.readouterr().err
