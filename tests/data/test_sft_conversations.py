"""Conversation formats (Alpaca, ShareGPT, OpenAI messages, prompt/completion) and files (JSON, JSONL,
Parquet, a save_to_disk folder) -> checked {role, content} messages, with LLaMA-Factory's conventions
and errors naming the file, the record and the field."""

from __future__ import annotations

import json

import pytest

from lmzoo.data.conversations import read_conversations, to_conversation
from lmzoo.errors import LmzooError
from tests.shared_data import DATA, need

U, A, S = "user", "assistant", "system"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_alpaca_follows_llama_factory():
    rec = {"instruction": "Translate", "input": "月亮", "output": "moon", "system": "Be brief.",
           "history": [["Hi", "Hello!"], ["2+2?", "4"]]}
    assert to_conversation(rec) == msgs((S, "Be brief."), (U, "Hi"), (A, "Hello!"), (U, "2+2?"), (A, "4"),
                                        (U, "Translate\n月亮"), (A, "moon"))
    assert to_conversation({"instruction": "Say hi", "input": "", "output": "hi"}) == msgs((U, "Say hi"), (A, "hi"))
    assert to_conversation({"instruction": "", "input": "only input", "output": "ok"}) == msgs((U, "only input"),
                                                                                               (A, "ok"))


def test_sharegpt_openai_and_pairs():
    share = {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q1"},
                               {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
                               {"from": "gpt", "value": "a2"}]}
    assert to_conversation(share) == msgs((S, "sys"), (U, "q1"), (A, "a1"), (U, "q2"), (A, "a2"))
    assert to_conversation({"system": "s", "conversations": share["conversations"][1:3]}) == msgs(
        (S, "s"), (U, "q1"), (A, "a1"))
    openai = {"messages": msgs((S, "sys"), (U, "q"), (A, "a"))}
    assert to_conversation(openai) == openai["messages"]
    assert to_conversation({"prompt": "p", "completion": "c"}) == msgs((U, "p"), (A, "c"))


@pytest.mark.parametrize("record, match", [
    ({"text": "hello"}, r"fits no format: it has keys \['text'\]"),
    ({"messages": []}, "empty conversation"),
    ({"messages": msgs((U, "q"), (A, "a"), (U, "more?"))}, "ends with a 'user' turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
     r"messages\[1\]\.content holds int"),
    ({"messages": msgs((U, "q"), (U, "q again"), (A, "a"))}, "message 1 is 'user' where 'assistant' was expected"),
    ({"messages": msgs((A, "a"))}, "message 0 is 'assistant' where 'user'"),
    ({"messages": msgs((U, "q"), ("tool", "42"), (A, "a"))}, r"messages\[1\] is a tool turn \(role 'tool'\)"),
    ({"messages": msgs((U, "q"), (A, "  "))}, "message 1 is an empty assistant turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"},
                        {"from": "observation", "value": "1"}, {"from": "gpt", "value": "a"}]},
     r"conversations\[1\]\.from is 'function_call': tool turns"),
    ({"conversations": [{"from": "bot", "value": "a"}]}, r"conversations\[0\]\.from is 'bot'"),
    ({"conversations": [{"from": "human", "value": ["q"]}, {"from": "gpt", "value": "a"}]},
     r"conversations\[0\]\.value holds list"),
    ({"instruction": "q", "output": ["a", "b"]}, "output holds list"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, r"history\[0\] is not a \[user, assistant\]"),
    ({"prompt": "p", "completion": None}, "fits no format"),
])
def test_bad_records_name_the_field(tmp_path, record, match):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "fine", "input": "", "output": "ok"}, record]))
    with pytest.raises(LmzooError, match=f"data.json: record 1: {match}"):
        read_conversations(path)


def test_forced_format_and_not_a_list(tmp_path):
    with pytest.raises(LmzooError, match="not in the sharegpt format"):
        to_conversation({"messages": msgs((U, "q"), (A, "a"))}, fmt="sharegpt")
    with pytest.raises(LmzooError, match="unknown conversation format"):
        to_conversation({"messages": []}, fmt="vicuna")
    (tmp_path / "d.json").write_text(json.dumps({"messages": []}))
    with pytest.raises(LmzooError, match="expected a JSON list of records"):
        read_conversations(tmp_path / "d.json")
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(LmzooError, match=r"d.txt: conversations are read from \.json, \.jsonl"):
        read_conversations(tmp_path / "d.txt")


RECORDS = [{"instruction": "把 305 写成中文数字。", "input": "", "output": "三百零五"},
           {"instruction": "Sort", "input": "3 1 2", "output": "1 2 3"},
           {"instruction": "Add", "input": "", "output": "5", "history": [["hi", "hello"]]}]
WANT = [msgs((U, "把 305 写成中文数字。"), (A, "三百零五")), msgs((U, "Sort\n3 1 2"), (A, "1 2 3")),
        msgs((U, "hi"), (A, "hello"), (U, "Add"), (A, "5"))]


def test_every_file_kind_gives_the_same_conversations(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "d.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n\n",
                                      encoding="utf-8")
    keys = ["instruction", "input", "output", "history"]
    table = pa.table({k: [r.get(k) for r in RECORDS] for k in keys})  # history is null in the rows without one
    pq.write_table(table, tmp_path / "d.parquet")
    root = tmp_path / "dd"
    for split, rows in (("train", table), ("test", table.slice(0, 1))):  # DatasetDict layout
        (root / split).mkdir(parents=True)
        with pa.OSFile(str(root / split / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, rows.schema) as w:
                w.write_table(rows)
        state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}
        (root / split / "state.json").write_text(json.dumps(state))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for name in ("d.json", "d.jsonl", "d.parquet", "dd"):
        assert read_conversations(tmp_path / name) == WANT, name
    assert read_conversations(root, split="test") == WANT[:1]
    bad = pa.Table.from_pylist(RECORDS[:1] + [{"instruction": "q", "input": "", "output": ""}])
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(LmzooError, match="bad.parquet: row 1: message 1 is an empty assistant turn"):
        read_conversations(tmp_path / "bad.parquet")
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(LmzooError, match="bad.jsonl: line 2 is not valid JSON"):
        read_conversations(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_real_alpaca_demo(lang):
    path = need(DATA / "sft" / f"alpaca_{lang}_demo.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    convs = read_conversations(path)
    assert len(convs) == len(raw) >= 999
    assert all([m["role"] for m in c] == [U, A] for c in convs)
    with_input = [k for k, r in enumerate(raw) if r["input"]]
    assert with_input, "the demo has records with an input"
    for k in with_input[:20]:
        assert convs[k][0]["content"] == raw[k]["instruction"] + "\n" + raw[k]["input"]
        assert convs[k][1]["content"] == raw[k]["output"]
