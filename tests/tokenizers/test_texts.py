"""read_texts: the training / comparison text of a file, a line per "\n" line, bad files named."""

from __future__ import annotations

import json

import pytest

from lmzoo.errors import LmzooError
from lmzoo.tokenizers.texts import read_texts

SEPARATORS = ["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"]


def test_plain_text_lines_are_newline_lines(tmp_path):
    path = tmp_path / "zh.txt"
    lines = [f"第{i}行{s}仍是第{i}行" for i, s in enumerate(SEPARATORS)] + ["last line, CRLF"]
    path.write_bytes(("\n".join(lines[:-1]) + "\n" + lines[-1] + "\r\n").encode("utf-8"))
    with open(path, encoding="utf-8") as f:  # Python's own line reading is the reference
        expected = [ln.rstrip("\n") for ln in f]
    assert read_texts(path) == expected == lines  # 9 lines; str.splitlines() made 17 of them
    assert len(path.read_text(encoding="utf-8").splitlines()) == 17


def test_jsonl_record_with_a_raw_line_separator(tmp_path):
    path = tmp_path / "a.jsonl"
    records = [{"text": "上联\u2028下联"}, {"text": "plain"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert read_texts(path) == ["上联\u2028下联", "plain"]  # the old reader: "not valid JSON"
    path.write_text('{"text": "ok"}\n{broken\n', encoding="utf-8")
    with pytest.raises(LmzooError, match=r"a\.jsonl: line 2 is not valid JSON"):
        read_texts(path)


@pytest.mark.parametrize("name", ["blob.txt", "blob.json", "blob.jsonl"])
def test_binary_file_is_named_not_a_traceback(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"abc\n\x89PNG\r\n\x1a\n")
    with pytest.raises(LmzooError, match=rf"{name}: not UTF-8 text \(invalid start byte at byte 4\)$"):
        read_texts(path)
    with pytest.raises(LmzooError, match=r"nope\.txt: no such file"):
        read_texts(tmp_path / "nope.txt")
