"""Preference pairs: every format detected and converted (the real LLaMA-Factory files too), the HH
split, labels on the last assistant turn only, truncation and its counts, the errors, the built-in
pairs (chosen right, rejected wrong by the task checker) and resumable batches."""

from __future__ import annotations

import json

import pytest
import torch

import lmzoo
from lmzoo.data.conversations import SHAREGPT_ROLES
from lmzoo.data.builtin_preference import builtin_preference_data
from lmzoo.data.preference import (PairBatches, PreferencePair, concatenated,
                                   detect_pair_format, encode_pairs, encode_unpaired, parse_hh, read_pairs,
                                   read_unpaired, to_pair)
from lmzoo.data.sft import IGNORE
from lmzoo.data.tasks import check
from lmzoo.errors import ConfigError, LmzooError
from tests.data.test_sft import char_tokenizer  # one id per character
from tests.shared_data import DATA, need

U = {"role": "user"}
A = {"role": "assistant"}


@pytest.fixture(scope="module")
def chars():
    return char_tokenizer("userassistantsystem\n hiyookno!0123456789abcdefghijklmnopqrstuvwxyzXY")


def user(text):
    return {**U, "content": text}


def bot(text):
    return {**A, "content": text}


def pair(prompt, chosen, rejected):
    return PreferencePair([user(prompt)] if isinstance(prompt, str) else prompt, chosen, rejected)


# -- formats ------------------------------------------------------------------------------------


def test_every_format_is_detected_and_converted():
    want = PreferencePair([user("hi")], "yo", "no")
    records = {
        "sharegpt": {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "yo"},
                     "rejected": {"from": "gpt", "value": "no"}},
        "trl": {"prompt": "hi", "chosen": "yo", "rejected": "no"},
        "alpaca": {"instruction": "hi", "input": "", "chosen": "yo", "rejected": "no"},
        "hh": {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
    }
    for fmt, record in records.items():
        assert detect_pair_format(record) == fmt
        assert to_pair(record) == want, fmt
    trl_chat = {"prompt": [user("hi")], "chosen": [bot("yo")], "rejected": [bot("no")]}
    implicit = {"chosen": [user("hi"), bot("yo")], "rejected": [user("hi"), bot("no")]}  # TRL's implicit prompt
    assert to_pair(trl_chat) == to_pair(implicit) == want
    assert detect_pair_format(trl_chat) == "trl" and detect_pair_format(implicit) == "hh"
    sys_gpt = {"system": "be", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"},
                                                 {"from": "human", "value": "and?"}],
               "chosen": {"from": "gpt", "value": "yo"}, "rejected": {"from": "gpt", "value": "no"}}
    assert to_pair(sys_gpt).prompt == [{"role": "system", "content": "be"}, user("hi"), bot("ok"), user("and?")]
    alpaca = to_pair({"system": "be", "instruction": "add", "input": "1 2", "chosen": "3", "rejected": "4"})
    assert alpaca.prompt == [{"role": "system", "content": "be"}, user("add\n1 2")]


def test_hh_two_rounds_split_at_the_last_assistant_turn():
    shared = "\n\nHuman: What is 2 + 2?\n\nAssistant: 4.\n\nHuman: And times 3?\n\nAssistant:"
    record = {"chosen": shared + " It is 12.", "rejected": shared + " It is 7,\n\nor so."}
    p = to_pair(record)
    assert p.prompt == [user("What is 2 + 2?"), bot("4."), user("And times 3?")]
    assert (p.chosen, p.rejected) == ("It is 12.", "It is 7,\n\nor so.")  # "\n\n" inside a turn stays
    assert parse_hh("Human: hi\n\nAssistant: yo") == [user("hi"), bot("yo")]
    same = to_pair({"chosen": shared + " 12", "rejected": shared + " 12"})  # valid; skipped when encoded
    assert same.chosen == same.rejected == "12" and len(same.prompt) == 3
    with pytest.raises(LmzooError, match=r"differ at turn 0 \(of 4 and 4\), not only in their last assistant turn"):
        to_pair({"chosen": shared + " 12", "rejected": shared.replace("2 + 2", "2 + 3") + " 12"})
    with pytest.raises(LmzooError, match="chosen is not an HH transcript"):
        to_pair({"chosen": "hi there", "rejected": shared + " 12"})


def test_errors_name_the_file_record_and_field(tmp_path):
    def bad(records, match, suffix=".json"):
        path = tmp_path / f"bad{suffix}"
        path.write_text("\n".join(json.dumps(r) for r in records) if suffix == ".jsonl" else json.dumps(records))
        with pytest.raises(LmzooError, match=match):
            read_pairs(path)

    good = {"prompt": "hi", "chosen": "yo", "rejected": "no"}
    bad([good, {"prompt": "hi", "chosen": "yo"}], r"bad.json: record 1: fits no preference format: it has keys "
                                                  r"\['chosen', 'prompt'\]")
    bad([good, good, {"prompt": "hi", "chosen": "yo", "rejected": 3}], r"bad.jsonl: line 3: rejected holds int",
        suffix=".jsonl")
    bad([{**good, "rejected": "  "}], r"record 0: prompt \+ rejected: message 1 is an empty assistant turn")
    bad([{"prompt": [user("hi"), bot("yo")], "chosen": "a", "rejected": "b"}],
        r"record 0: prompt \+ chosen: message 2 is 'assistant' where 'user' was expected")
    bad([{"conversations": [{"from": "human", "value": "hi"}], "chosen": "yo", "rejected": {"value": "no"}}],
        r"record 0: chosen holds str, expected a \{from, value\} object")
    bad([{"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "human", "value": "yo"},
          "rejected": {"value": "no"}}], r"record 0: chosen.from is 'human'")
    bad([{"prompt": "hi", "chosen": [bot("a"), user("b"), bot("c")], "rejected": "n"}],
        r"record 0: chosen holds \['assistant', 'user', 'assistant'\]; a response is one assistant message")
    bad([{"prompt": "hi", "completion": "yo", "label": True}], "unpaired KTO data: read it with read_unpaired")
    bad([good, {"chosen": [], "rejected": [user("hi"), bot("no")]}], "record 1: chosen is an empty transcript")
    bad([], "holds no records")
    with pytest.raises(LmzooError, match="unknown preference format 'dpo'"):
        to_pair(good, fmt="dpo")


def test_the_real_llama_factory_files_all_convert():
    tok = lmzoo.train_tokenizer("bpe", texts=["hello"], vocab_size=270, special_tokens=["<|im_start|>", "<|im_end|>"])
    for lang, n_system in (("en", 80), ("zh", 64)):
        path = need(DATA / "preference" / f"dpo_{lang}_demo.json")
        raw = json.loads(path.read_text(encoding="utf-8"))
        pairs = read_pairs(path)
        assert len(pairs) == len(raw) == 300
        assert sum(p.prompt[0]["role"] == "system" for p in pairs) == n_system  # "system" turns of conversations
        for p, r in zip(pairs, raw):
            assert [m["content"] for m in p.prompt] == [m["value"] for m in r["conversations"]]
            assert [m["role"] for m in p.prompt] == [SHAREGPT_ROLES[m["from"]] for m in r["conversations"]]
            assert (p.chosen, p.rejected) == (r["chosen"]["value"], r["rejected"]["value"])
        ex = encode_pairs(tok, pairs[:20], "chatml", max_len=100_000)  # byte-level BPE: every text round-trips
        assert ex.counts == {"kept": 20, "truncated": 0, "dropped": 0, "identical": 0}
        for k, p in enumerate(pairs[:20]):
            trained = [y for y in ex.rejected_labels[k] if y != IGNORE]
            assert tok.decode(trained) == p.rejected + "<|im_end|>"
            assert tok.decode(ex.chosen_ids[k]).endswith(p.chosen + "<|im_end|>")


# -- encoding ------------------------------------------------------------------------------------


def test_labels_are_the_last_answer_and_its_end_token(chars):
    # <|im_start|> u s e r \n h i <|im_end|> \n = 0-9; <|im_start|> a s s i s t a n t \n = 10-20; "yo" 21-22
    ex = encode_pairs(chars, [pair("hi", "yo", "no!")], "chatml", max_len=64)
    end = chars.token_to_id("<|im_end|>")
    assert len(ex.chosen_ids[0]) == 24 and len(ex.rejected_ids[0]) == 25  # the trailing "\n" is cut
    assert [k for k, y in enumerate(ex.chosen_labels[0]) if y != IGNORE] == [21, 22, 23]
    assert ex.rejected_labels[0][21:] == ex.rejected_ids[0][21:] and ex.rejected_ids[0][24] == end
    assert chars.decode(ex.rejected_ids[0][21:24]) == "no!" and ex.chosen_ids[0][:21] == ex.rejected_ids[0][:21]
    # an earlier assistant turn is prompt: round 1 is 25 tokens, round 2's answer starts at 25 + 21
    multi = encode_pairs(chars, [pair([user("hi"), bot("ok"), user("hi")], "yo", "no")], "chatml", 64)
    assert [k for k, y in enumerate(multi.chosen_labels[0]) if y != IGNORE] == [46, 47, 48]
    with pytest.raises(ConfigError, match=r"chat template 'llama2' writes \['bos_token'\]"):
        encode_pairs(chars, [pair("hi", "yo", "no")], "llama2", 64)


def test_overlong_pairs_are_truncated_or_dropped_and_counted(chars):
    long_answer = "abcdefghijklmnopqrst"  # 20 characters
    pairs = [pair("hi", "yo", "no"),  # 24 tokens: kept
             pair("hi", "0123456789", "no"),  # 32 > 30: the prompt loses its first 2 tokens, the answer stays whole
             pair("hi", long_answer, "no"),  # 42: prompt cut to 15 = max_len // 2, answers to their first 15
             pair("hi", "yo", "yo"),  # identical: skipped
             pair("hi", long_answer + "X", long_answer + "Y")]  # differ only past max_len: identical when cut
    full = encode_pairs(chars, pairs[1:3], "chatml", max_len=100)
    ex = encode_pairs(chars, pairs, "chatml", max_len=30)
    assert ex.counts == {"kept": 1, "truncated": 2, "dropped": 0, "identical": 2} and ex.identical_index == [3, 4]
    assert ex.chosen_ids[1] == full.chosen_ids[0][2:32] and len(ex.chosen_ids[1]) == 30
    assert [k for k, y in enumerate(ex.chosen_labels[1]) if y != IGNORE] == list(range(19, 30))
    assert ex.rejected_ids[1] == full.rejected_ids[0][2:]  # the same prompt cut on both sides
    assert ex.chosen_ids[2] == full.chosen_ids[1][6:36] and ex.rejected_ids[2] == full.rejected_ids[1][6:]
    assert [k for k, y in enumerate(ex.chosen_labels[2]) if y != IGNORE] == list(range(15, 30))
    assert chars.decode(ex.chosen_ids[2][:15]).endswith("hi<|im_end|>\n<|im_start|>assistant\n")  # the prompt's end
    assert "5 pairs: 1 kept, 2 truncated to 30 tokens, 0 dropped" in ex.summary()
    assert "2 skipped (chosen and rejected identical)" in ex.summary()
    dropped = encode_pairs(chars, pairs, "chatml", max_len=30, overflow="drop")
    assert dropped.counts == {"kept": 1, "truncated": 0, "dropped": 3, "identical": 1}
    assert dropped.dropped_index == [1, 2, 4]
    short_prompt = encode_pairs(chars, [pair("hi", long_answer * 2, "no")], "chatml", 30, max_prompt_len=5)
    assert [k for k, y in enumerate(short_prompt.chosen_labels[0]) if y != IGNORE] == list(range(5, 30))
    with pytest.raises(LmzooError, match="no preference pair is left"):
        encode_pairs(chars, pairs[3:4], "chatml", 30)
    with pytest.raises(LmzooError, match="overflow must be one of"):
        encode_pairs(chars, pairs, "chatml", 30, overflow="wrap")


# -- built-in pairs and batches ----------------------------------------------------------------------


@pytest.mark.parametrize("level", ["full", "easy"])
def test_builtin_pairs_are_right_over_wrong_and_deterministic(level):
    data = builtin_preference_data(300, seed=3, level=level, n_eval=40)
    assert len(data.train) == len(data.train_tasks) == 300 and len(data.eval_tasks) == 40
    for p, t in zip(data.train, data.train_tasks):
        assert p.prompt == [user(t.prompt)]
        assert check(t, p.chosen) and not check(t, p.rejected), (t, p.rejected)
    assert {t.kind for t in data.train_tasks} == {"add", "sub", "mul", "to_chinese", "from_chinese", "sort"}
    assert not {t.prompt for t in data.eval_tasks} & {t.prompt for t in data.train_tasks}
    assert builtin_preference_data(300, seed=3, level=level, n_eval=40) == data
    other = builtin_preference_data(300, seed=4, level=level, n_eval=40)
    assert sum(a != b for a, b in zip(other.train, data.train)) > 250


def test_batches_are_padded_right_and_resume_exactly(chars):
    data = builtin_preference_data(40, seed=0, lang="en", level="easy", kinds=["add", "sort"], n_eval=0)
    tok = char_tokenizer("".join(p.prompt[0]["content"] + p.chosen + p.rejected for p in data.train)
                         + "userassistant\n")
    ex = encode_pairs(tok, data.train, "chatml", max_len=64)
    batches = PairBatches(ex, 4, seed=5)
    first = next(batches)
    assert first["chosen_input_ids"].shape == first["rejected_input_ids"].shape
    for side in ("chosen", "rejected"):
        mask = first[f"{side}_attention_mask"]
        assert (mask[:, 0] == 1).all() and (mask[:, 1:] <= mask[:, :-1]).all()  # right padding
        assert (first[f"{side}_labels"][mask == 0] == IGNORE).all()
    both = concatenated(first)
    assert both["input_ids"].shape[0] == 8 and (both["input_ids"][4:] == first["rejected_input_ids"]).all()
    for _ in range(3):
        next(batches)
    state = batches.state_dict()
    want = [next(batches) for _ in range(4)]  # crosses into epoch 2 (10 batches an epoch)
    again = PairBatches(ex, 4, seed=5)
    again.load_state_dict(state)
    for a, b in zip(want, (next(again) for _ in range(4))):
        assert all((a[k] == b[k]).all() for k in a)
    assert not torch.equal(next(PairBatches(ex, 4, seed=6))["chosen_input_ids"], first["chosen_input_ids"])


def test_unpaired_kto_records(tmp_path, chars):
    path = tmp_path / "kto.jsonl"
    path.write_text('{"prompt": "hi", "completion": "yo", "label": true}\n'
                    '{"prompt": [{"role": "user", "content": "hi"}], "completion": "no", "label": false}\n')
    examples = read_unpaired(path)
    assert [(e.prompt, e.completion, e.desirable) for e in examples] == [([user("hi")], "yo", True),
                                                                         ([user("hi")], "no", False)]
    enc = encode_unpaired(chars, examples, "chatml", max_len=64)
    b = enc.batch([0, 1])
    assert b["desirable"].tolist() == [True, False] and b["input_ids"].shape == (2, 24)
    assert [k for k, y in enumerate(b["labels"][1].tolist()) if y != IGNORE] == [21, 22, 23]
    path.write_text('{"prompt": "hi", "completion": "yo", "label": 1}\n')
    with pytest.raises(LmzooError, match=r"kto.jsonl: line 1: label holds 1, expected true or false"):
        read_unpaired(path)
