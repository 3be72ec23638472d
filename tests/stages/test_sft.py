"""``lmzoo sft``: the loss by hand on a 2-turn conversation, every decoder family (full, LoRA, QLoRA),
the run folder's contract, bad input, and the end-to-end claim: finetuning on the built-in data makes a
tiny pretrained model answer held-out tasks right more often, and ``lmzoo chat`` then answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import lmzoo
from lmzoo.cli.main import main
from lmzoo.stages import sft

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "configs" / "sft" / "tiny.yaml"
TEXTS = ["What is 3 + 4? 7", "从小到大排序：3 1 2 -> 1 2 3", "Translate into Chinese: two", "把 5 写成中文数字。五",
         "hello world 你好 世界 " * 4, "0 1 2 3 4 5 6 7 8 9 十 百 千 万 一 二 三 四 五 六 七 八 九"] * 20
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "[MASK]", "[gMASK]", "<sop>", "<eop>"]


def tiny_decoder(family: str, tok, **over):
    """A random tiny model of ``family`` on ``tok``'s vocabulary (from its shipped pretraining config)."""
    from lmzoo.stages.pretrain import model_config

    section = {k: v for k, v in yaml.safe_load((ROOT / "configs" / family / "tiny.yaml").read_text())["model"].items()
               if k != "init_std" and not (k.endswith("_token_id") and tok.token_to_id(str(v)) is None)}
    section.update(vocab_size=tok.vocab_size, **over)  # special tokens named as strings: looked up in ``tok``
    for field, role in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "pad")):
        section.setdefault(field, tok.special_id(role))
    _, cfg = model_config(section, tok)
    torch.manual_seed(0)
    return lmzoo.build(cfg)


@pytest.fixture(scope="module")
def tok():
    t = lmzoo.train_tokenizer("bpe", texts=TEXTS, vocab_size=400, special_tokens=SPECIALS)
    for role, token in (("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>")):
        t.set_special(role, token)
    return t


def small_cfg(steps: int = 6, **data) -> dict:
    cfg = yaml.safe_load(SHIPPED.read_text())
    cfg["data"].update({"seq_len": 64, "batch_size": 4, "builtin": {"n": 120, "n_eval": 8}, **data})
    cfg["eval"].update({"n": 8, "max_new_tokens": 6})
    cfg["train"].update({"steps": steps, "log_every": 1, "eval_every": 0, "progress": False, "plot": False,
                         "warmup_steps": 0})
    cfg["loss"]["chunk"] = 32
    return cfg


def test_the_shipped_config_is_valid():
    cfg = yaml.safe_load(SHIPPED.read_text())
    sft.check_config(cfg, str(SHIPPED))
    assert cfg["data"]["files"] == [] and cfg["loss"]["chunk"] > 0


def test_loss_by_hand_on_two_turns(tok, tmp_path):
    """The step's loss is the mean cross-entropy over the two answers' tokens (and their </s>), no more."""
    from lmzoo.data.sft import encode_conversation
    from lmzoo.objectives import make_step_fn

    model = tiny_decoder("llama", tok).eval()
    conv = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"},
            {"role": "user", "content": "把 5 写成中文数字。"}, {"role": "assistant", "content": "五"}]
    ids, labels = encode_conversation(tok, conv, template="chatml")
    text = tok.render_chat(conv, template="chatml")[0]
    # the trained positions, found independently: the tokens of "7<|im_end|>" and "五<|im_end|>"
    answer_ids = [tok.encode("7") + [tok.token_to_id("<|im_end|>")], tok.encode("五") + [tok.token_to_id("<|im_end|>")]]
    trained = [k for k, y in enumerate(labels) if y != -100]
    assert [ids[k] for k in trained] == answer_ids[0] + answer_ids[1] and text.count("<|im_end|>") == 4
    x = torch.tensor([ids])
    logits = model(x).logits[0].float()  # (T, V)
    by_hand = sum(-F.log_softmax(logits[k - 1], -1)[ids[k]] for k in trained) / len(trained)
    batch = {"input_ids": x, "labels": torch.tensor([labels])}
    for chunk in (0, 3):
        loss, metrics = make_step_fn("sft", loss_chunk=chunk)(model.train(chunk > 0), batch)
        torch.testing.assert_close(loss, by_hand, atol=1e-5, rtol=1e-5)
        assert metrics["n_tokens"] == len(trained)


@pytest.mark.parametrize("family,mode", [("llama", "full"), ("gpt2", "lora"), ("bloom", "full"),
                                         ("chatglm2", "lora"), ("deepseek_v2", "full"), ("llama", "qlora"),
                                         ("chatglm", "full"), ("chatglm", "lora")])
def test_every_decoder_family_finetunes(family, mode, tok, tmp_path):
    model_dir = lmzoo.save(tiny_decoder(family, tok), tmp_path / "base", tokenizer=tok)
    cfg = small_cfg(steps=8)
    if family == "chatglm":  # the prefix decoder: ChatGLM-6B's own chat format, one conversation per row
        cfg["data"]["template"] = "chatglm"
    res = sft.run(cfg, model_dir, tmp_path / "run", lora=mode == "lora", qlora=mode == "qlora")
    assert res.train.step == 8
    from lmzoo.train.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "train"]
    assert losses[-1] < losses[0], losses  # it learns (the answers are short and regular)
    final = lmzoo.load(res.final_dir)
    assert lmzoo.load_tokenizer(res.final_dir).chat_template  # the template it was trained with travels along
    assert math.isfinite(res.train.eval["loss"]) and 0.0 <= res.accuracy_after <= 1.0
    if mode != "full":
        assert (res.adapter_dir / "adapter_config.json").is_file()
        # final/ is the base with the adapter folded in: equal to base + adapter
        from lmzoo.peft import load_adapter

        base = lmzoo.load(model_dir)
        load_adapter(base, res.adapter_dir)
        ids = torch.tensor([tok.encode("What is 3 + 4?") + tok.encode("[gMASK]<sop>")])  # GLM reads its prefix off them
        torch.testing.assert_close(final.eval()(ids).logits, base.eval()(ids).logits, atol=1e-4, rtol=1e-4)
        if mode == "qlora":  # the adapter trained on an NF4 base, merged into the float one
            cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
            assert cfg["peft_type"] == "LORA"


def test_bad_input_is_one_clear_error(tok, tmp_path, capsys):
    model_dir = lmzoo.save(tiny_decoder("llama", tok), tmp_path / "base", tokenizer=tok)
    from lmzoo.models.registry import get_preset

    bert_cfg = get_preset("bert-base-uncased")[1].replace(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64,
                                                          vocab_size=tok.vocab_size)
    bert = lmzoo.save(lmzoo.build(bert_cfg), tmp_path / "bert", tokenizer=tok)
    (tmp_path / "odd.jsonl").write_text('{"question": "hi", "reply": "yo"}\n', encoding="utf-8")
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    cases = [
        (["--data", str(tmp_path / "odd.jsonl")], "line 1: fits no format"),
        (["--data", str(tmp_path / "empty.json")], "empty.json: holds no records"),
        (["--set", "lora.targets=[nope_proj]", "--lora"], "nope_proj"),
        (["--template", "chatglm3"], "does not have"),
        (["--seq-len", "100000"], "longer than the model's context"),
        (["--set", "data.seq_len=64.5"], "data.seq_len must be an integer"),
        (["--set", "data.colour=blue"], "unknown key"),
    ]
    for extra, message in cases:
        assert main(["sft", "--model", str(model_dir), "--out", str(tmp_path / "never"), "--steps", "1",
                     "--no-progress", *extra]) == 1, extra
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and err[0].startswith("lmzoo sft: error:") and message in err[0], (extra, err)
    assert main(["sft", "--model", str(bert), "--out", str(tmp_path / "never"), "--steps", "1"]) == 1
    assert "trains causal decoders" in capsys.readouterr().err
    assert not (tmp_path / "never" / "final").exists()


def test_a_conversation_too_long_is_counted_not_lost(tok, tmp_path):
    model_dir = lmzoo.save(tiny_decoder("llama", tok), tmp_path / "base", tokenizer=tok)
    long = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"},
            {"role": "user", "content": "hello world " * 40}, {"role": "assistant", "content": "8"}]
    short = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}]
    (tmp_path / "d.json").write_text(json.dumps([{"messages": m} for m in [long, short] * 20]), encoding="utf-8")
    seen = {}
    for overflow in ("truncate", "drop"):
        res = sft.run(small_cfg(steps=1, files=[str(tmp_path / "d.json")], overflow=overflow, val_fraction=0.1),
                      model_dir, tmp_path / overflow)
        kept, truncated, dropped = map(int, __import__("re").search(
            r"(\d+) kept, (\d+) truncated to 64 tokens, (\d+) dropped", res.data_summary).groups())
        seen[overflow] = (kept, truncated, dropped)
    n = sum(seen["truncate"])
    assert n == 36 and sum(seen["drop"]) == 36  # 40 minus the 4 held out: every one is accounted for
    assert seen["truncate"][1] >= 15 and seen["truncate"][2] == 0  # cut after their first answer, kept
    assert seen["drop"][2] == seen["truncate"][1] and seen["drop"][1] == 0  # the same ones, left out


def test_builtin_sft_makes_a_pretrained_model_answer_better_and_chat_answers(sft_sorting, capsys):
    """The end-to-end claim on a tiny pretrained model: exact-match accuracy on held-out built-in tasks
    (prompts never seen in training) rises from its starting value, measured by the stage before and after
    (the session's 250-step SFT run on sorting, ``tests/stages/conftest.py::sft_sorting``)."""
    res = sft_sorting
    print(f"SFT on sorting: held-out accuracy {res.accuracy_before:.2f} -> {res.accuracy_after:.2f}")
    # 0.0 -> ~0.40 on AVX-512 CPUs, 0.0 -> 0.13 on an AVX2 Zen 3: 250 steps end mid-climb, where the kernels'
    # summation order moves the trajectory (300 steps pass 0.25 there, but leave the preference and GRPO tests
    # that start from this model too little room). 13 of 100 held-out prompts right against 0 is still the claim.
    assert res.accuracy_after >= res.accuracy_before + 0.1, (res.accuracy_before, res.accuracy_after)
    capsys.readouterr()
    assert main(["chat", "--model", str(res.final_dir), "--prompt", "Sort ascending: 7 0 6", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out.strip()
    from lmzoo.data.tasks import Task, check

    assert out and all(c.isdigit() or c == " " for c in out), out  # an answer in the trained form
    import sys

    print(f"accuracy {res.accuracy_before:.2f} -> {res.accuracy_after:.2f}; chat: {out!r}, right: "
          f"{check(Task('sort', 'Sort ascending: 7 0 6', '0 6 7', 'en'), out)}", file=sys.__stderr__)



def test_cli_resume_is_bitwise_the_uninterrupted_run(tok, tmp_path, capsys):
    """`lmzoo sft --lora` resumed from its step-3 checkpoint (as after a crash) ends with the weights of the
    uninterrupted 6-step run, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    model_dir = lmzoo.save(tiny_decoder("llama", tok), tmp_path / "base", tokenizer=tok)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(small_cfg(steps=6)), encoding="utf-8")
    common = ["sft", "--model", str(model_dir), "--config", str(tmp_path / "sft.yaml"), "--lora", "--no-progress",
              "--save-every", "3"]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    shutil.copytree(tmp_path / "straight", tmp_path / "crashed")
    for later in ("final", "adapter", "checkpoints/step_00000006"):  # what a crash after step 3 would not have
        shutil.rmtree(tmp_path / "crashed" / later)
    assert main([*common, "--out", str(tmp_path / "crashed"), "--resume"]) == 0
    assert capsys.readouterr().out.strip().endswith("final")
    for name in ("adapter/adapter_model.safetensors", "final/model.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "crashed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
