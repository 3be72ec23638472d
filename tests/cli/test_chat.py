"""`lmzoo chat`: one --prompt turn, an interactive session fed line by line, history trimming, the
template choice and the errors, on a tiny model trained to give one answer."""

import os
import subprocess
import sys

import pytest
import torch

import lmzoo
import lmzoo.cli.chat as chat_cli
from lmzoo.cli.main import main
from lmzoo.models.llama.config import LlamaConfig

ANSWER = "你好！我是小动物园 lmzoo。"
CONTEXT = 128


def _tokenizer(template="chatml"):
    texts = [ANSWER, "hello world, 床前明月光，疑是地上霜。", "user assistant system 简短 再来一次"] * 10
    return lmzoo.train_tokenizer("bpe", texts, vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                 chat_template=template)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A 1-layer LLaMA trained until greedy decoding answers "你好" with ANSWER, under chatml."""
    tok = _tokenizer()
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "你好"},
                                                 {"role": "assistant", "content": ANSWER}]).ids])
    torch.manual_seed(0)
    model = lmzoo.build(LlamaConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, d_ff=64,
                                    max_positions=CONTEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lmzoo.save(model.eval(), tmp_path_factory.mktemp("chat") / "m", tokenizer=tok)


def _messages(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def _prompt_ids(d, messages):
    return lmzoo.load_tokenizer(d).apply_chat_template(messages, add_generation_prompt=True).ids


@pytest.fixture
def seen(monkeypatch):
    """The prompt ids of every answer the chat asked the engine for."""
    prompts = []

    def spy(model, input_ids, **kw):
        prompts.append(input_ids[0].tolist())
        return lmzoo.stream(model, input_ids, **kw)

    monkeypatch.setattr(chat_cli, "stream", spy)
    return prompts


def _feed(monkeypatch, lines):
    """builtins.input reading ``lines``; an exception instance in the list is raised instead."""
    it = iter(lines)

    def fake_input(prompt=""):
        item = next(it)
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)
    return it


def test_prompt_answers_once_stops_at_end_of_turn_and_keeps_characters_whole(chat_dir, capsys):
    assert main(["chat", "--model", str(chat_dir), "--prompt", "你好", "--max-new-tokens", "60"]) == 0
    # the model goes on with "\n<|im_start|>assistant..." after <|im_end|>: the answer stops before it
    assert capsys.readouterr().out == ANSWER + "\n"
    # streaming: the answer's byte-level tokens cut characters in two, and no write shows a half character
    tok = lmzoo.load_tokenizer(chat_dir)
    writes = []
    out = type("W", (), {"write": lambda self, s: writes.append(s), "flush": lambda self: None})()
    c = chat_cli.Chat(lmzoo.load(chat_dir), tok, tok.chat_template, system=None, stop=[tok.token_to_id("<|im_end|>")],
                      context=CONTEXT, max_new_tokens=60, sampling={}, seed=0, out=out)
    assert c.answer("你好") == ANSWER and "".join(writes) == ANSWER + "\n"
    assert not any("\ufffd" in w for w in writes)
    assert any("\ufffd" in tok.decode([t]) for t in tok.encode(ANSWER))
    assert c.turns == _messages(("user", "你好"), ("assistant", ANSWER))


def test_interactive_session_system_reset_two_turns_and_exit(chat_dir, capsys, monkeypatch, seen):
    rest = _feed(monkeypatch, ["/help", "/system 简短", "你好", "", "再来一次", "/reset", "你好", "/nope", "/exit",
                               "never read"])
    assert main(["chat", "--model", str(chat_dir), "--max-new-tokens", "40"]) == 0
    assert next(rest) == "never read"  # /exit ended the session
    out, err = capsys.readouterr()
    sys_msg = ("system", "简短")
    first = _prompt_ids(chat_dir, _messages(sys_msg, ("user", "你好")))
    second = _prompt_ids(chat_dir, _messages(sys_msg, ("user", "你好"), ("assistant", ANSWER), ("user", "再来一次")))
    assert seen == [first, second, first]  # the second prompt carries the first turn; /reset forgets it
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0] == lines[2] == ANSWER
    assert "/system TEXT" in err and "/reset" in err and "(system prompt set)" in err
    assert "(conversation reset)" in err and "unknown command /nope" in err and "Traceback" not in err


def test_system_alone_removes_it_and_eof_and_ctrl_c_leave_cleanly(chat_dir, capsys, monkeypatch, seen):
    _feed(monkeypatch, ["/system", "你好", EOFError()])
    assert main(["chat", "--model", str(chat_dir), "--system", "简短", "--max-new-tokens", "40"]) == 0
    assert seen == [_prompt_ids(chat_dir, _messages(("user", "你好")))]
    assert capsys.readouterr().out == ANSWER + "\n"
    _feed(monkeypatch, [KeyboardInterrupt()])
    assert main(["chat", "--model", str(chat_dir)]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_during_an_answer_stops_it_and_forgets_the_turn(chat_dir, capsys, monkeypatch):
    calls = []

    def interrupted(model, input_ids, **kw):
        calls.append(input_ids[0].tolist())
        if len(calls) == 1:
            raise KeyboardInterrupt
        return lmzoo.stream(model, input_ids, **kw)

    monkeypatch.setattr(chat_cli, "stream", interrupted)
    _feed(monkeypatch, ["再来一次", "你好", "/exit"])
    assert main(["chat", "--model", str(chat_dir), "--max-new-tokens", "40"]) == 0
    assert calls[1] == _prompt_ids(chat_dir, _messages(("user", "你好")))  # the interrupted turn is gone
    assert capsys.readouterr().out.splitlines()[-1] == ANSWER


def test_history_is_trimmed_oldest_first_keeping_the_system_prompt(chat_dir, capsys, monkeypatch, seen):
    sys_msg = ("system", "简短")
    first = _prompt_ids(chat_dir, _messages(sys_msg, ("user", "你好")))
    room = CONTEXT - len(first)  # the first prompt just fits; any longer history does not
    _feed(monkeypatch, ["你好", "你好", "床前明月光" * 40, "你好", "/exit"])
    assert main(["chat", "--model", str(chat_dir), "--system", "简短", "--max-new-tokens", str(room)]) == 0
    out, err = capsys.readouterr()
    assert seen == [first, first, first]  # turn 1 dropped for turn 2, turn 2 for turn 4; the system stays
    assert out.splitlines() == [ANSWER] * 3
    assert err.count("dropping the oldest turns") == 1  # said once
    assert f"exceeds the model's context of {CONTEXT} tokens" in err  # the too-long message, refused alone


def test_stdin_session_in_a_subprocess_round_trips_chinese(chat_dir):
    r = subprocess.run([sys.executable, "-m", "lmzoo", "chat", "--model", str(chat_dir), "--max-new-tokens", "40"],
                       input="/system 简短\n你好\n".encode(), capture_output=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode("utf-8") == ANSWER + "\n"  # EOF after the turn ends the session
    assert b"Traceback" not in r.stderr


def test_template_from_the_vocabulary_or_the_flag(chat_dir, tmp_path, capsys, seen):
    tok = lmzoo.load_tokenizer(chat_dir)
    tok.chat_template = None
    bare = lmzoo.save(lmzoo.load(chat_dir), tmp_path / "bare", tokenizer=tok)
    assert main(["chat", "--model", str(bare), "--prompt", "你好"]) == 0
    out, err = capsys.readouterr()
    assert out == ANSWER + "\n" and "using the built-in 'chatml'" in err  # its <|im_start|> picked chatml
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}>", encoding="utf-8")
    for flag in ("llama2", str(tmp_path / "t.jinja")):
        assert main(["chat", "--model", str(chat_dir), "--template", flag, "--prompt", "你好",
                     "--max-new-tokens", "3"]) == 0
    llama2 = tok.apply_chat_template(_messages(("user", "你好")), add_generation_prompt=True, template="llama2").ids
    assert seen == [_prompt_ids(chat_dir, _messages(("user", "你好"))), llama2, tok.encode("[你好]>")]


def _one_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("lmzoo chat: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_errors(chat_dir, tmp_path, capsys):
    from lmzoo.models.gpt2.config import GPT2Config

    torch.manual_seed(0)
    notok = lmzoo.save(lmzoo.load(chat_dir), tmp_path / "notok", tokenizer=False)
    plain = lmzoo.train_tokenizer("bpe", ["hello world"] * 10, vocab_size=270)  # no template, no chatml tokens
    untemplated = lmzoo.save(lmzoo.build(GPT2Config(vocab_size=plain.vocab_size, d_model=32, n_layers=1, n_heads=4,
                                                    d_ff=64, max_positions=64)), tmp_path / "gpt2", tokenizer=plain)
    cases = [
        (["--model", "gpt2", "--prompt", "hi"], "is not a directory"),
        (["--model", str(notok), "--prompt", "hi"], "holds no tokenizer"),
        (["--model", str(untemplated), "--prompt", "hi"], "has no chat template"),
        (["--model", str(untemplated), "--prompt", "hi"], "pass --template"),
        (["--model", str(chat_dir), "--template", "nosuch", "--prompt", "hi"], "neither a built-in"),
        (["--model", str(chat_dir), "--template", "{% if %}", "--prompt", "hi"], "does not compile"),
        (["--model", str(chat_dir), "--template", "chatglm2", "--system", "x", "--prompt", "hi"], "does not have"),
        (["--model", str(chat_dir), "--max-new-tokens", str(CONTEXT), "--prompt", "hi"], "leaves no room"),
        (["--model", str(chat_dir), "--top-p", "2", "--prompt", "hi"], "--top-p must be in (0, 1]"),
        (["--model", str(chat_dir), "--prompt", "床前明月光" * 60], "exceeds the model's context"),
    ]
    for argv, message in cases:
        assert main(["chat", *argv]) == 1, argv
        assert message in _one_error(capsys), argv
