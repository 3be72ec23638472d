"""Every reader gives the documents it should, and bad input names the file and what is wrong."""

import json
import re

import pytest

from lmzoo.data.readers import read_documents
from lmzoo.errors import LmzooError


def test_text_file_splits(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n\n\nthree\n  \nfour", encoding="utf-8")
    assert list(read_documents(f)) == ["one\ntwo\n\n\nthree\n  \nfour"]
    assert list(read_documents(f, split="blank")) == ["one\ntwo", "three", "four"]
    assert list(read_documents(f, split="line")) == ["one", "two", "three", "four"]  # blank lines dropped


def test_jsonl_field_and_errors(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "hello", "n": 1}\n\n{"text": "你好"}\n', encoding="utf-8")
    assert list(read_documents(f)) == ["hello", "你好"]
    g = tmp_path / "b.jsonl"
    g.write_text('{"content": "x"}\n{"body": "y"}\n')
    assert next(read_documents(g, field="content")) == "x"  # the first line is fine; the second lacks it
    with pytest.raises(LmzooError, match=r"b\.jsonl: line 2 has no field 'content' \(it has \['body'\]\)"):
        list(read_documents(g, field="content"))
    h = tmp_path / "c.jsonl"
    h.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(LmzooError, match=r"c\.jsonl: line 2 is not valid JSON"):
        list(read_documents(h))


def test_json_records_join_paragraph_lists(tmp_path):
    f = tmp_path / "poems.json"
    f.write_text(json.dumps([{"title": "t", "paragraphs": ["床前明月光，", "疑是地上霜。"]}], ensure_ascii=False))
    assert list(read_documents(f, field="paragraphs")) == ["床前明月光，\n疑是地上霜。"]
    f.write_text(json.dumps(["a", "b"]))
    assert list(read_documents(f)) == ["a", "b"]


def test_empty_missing_and_binary_inputs_name_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(LmzooError, match=r"empty\.txt: holds no text"):
        list(read_documents(empty))
    with pytest.raises(LmzooError, match=r"nope\.txt: no such file"):
        list(read_documents(tmp_path / "nope.txt"))
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(LmzooError, match=r"blob\.txt: not UTF-8 text"):
        list(read_documents(binary))


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["first doc", "second doc"], "id": [1, 2]}), f)
    assert list(read_documents(f)) == ["first doc", "second doc"]
    with pytest.raises(LmzooError, match=r"a\.parquet: no column 'body'"):
        list(read_documents(f, field="body"))


def _save_to_disk(folder, table, pa):
    """The layout datasets' save_to_disk writes: Arrow stream files listed in state.json."""
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                   "_split": None}))
    (folder / "dataset_info.json").write_text("{}")


def test_hf_save_to_disk_folders(tmp_path):
    pa = pytest.importorskip("pyarrow")
    _save_to_disk(tmp_path / "ds", pa.table({"text": ["a b", "c d"]}), pa)
    assert list(read_documents(tmp_path / "ds")) == ["a b", "c d"]
    root = tmp_path / "dd"
    _save_to_disk(root / "train", pa.table({"content": ["train text"]}), pa)
    _save_to_disk(root / "test", pa.table({"content": ["test text"]}), pa)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert list(read_documents(root, field="content")) == ["train text"]
    assert list(read_documents(root, field="content", split="test")) == ["test text"]
    with pytest.raises(LmzooError, match="no split 'validation'"):
        list(read_documents(root, field="content", split="validation"))
    with pytest.raises(LmzooError, match="not a dataset folder"):
        list(read_documents(tmp_path))


def test_shared_corpora_read_when_present():
    from tests.shared_data import DATA, need

    root = need(DATA / "corpora")
    docs = list(read_documents(root / "zh" / "tang300.json", field="paragraphs"))
    assert len(docs) == len(json.loads((root / "zh" / "tang300.json").read_text(encoding="utf-8")))  # one per poem
    assert sum(len(d) for d in read_documents(root / "en" / "tinyshakespeare.txt")) > 1_000_000


def test_lines_end_at_newlines_only(tmp_path):
    """U+2028 and the other characters str.splitlines() breaks at stay inside their line, as in
    open()'s line reading and the datasets text loader (huggingface/datasets#3910)."""
    f = tmp_path / "poems.txt"
    lines = ["床前明月光\u2028疑是地上霜", "举头望明月\u2029低头思故乡", "a\x85b\x0bc\x0cd\x1ce\x1df\x1eg", "crlf"]
    f.write_bytes("\n".join(lines).replace("crlf", "crlf\r\n").encode("utf-8"))
    with open(f, encoding="utf-8") as fh:
        assert [ln.rstrip("\n") for ln in fh] == lines
    assert list(read_documents(f, split="line")) == lines  # the old reader gave 12 lines
    assert list(read_documents(f, split="blank")) == ["\n".join(lines) + "\n"]
    g = tmp_path / "a.jsonl"
    g.write_text(json.dumps({"text": "上\u2028下"}, ensure_ascii=False) + "\r\n" + '{"text": "x"}\n', encoding="utf-8")
    assert list(read_documents(g)) == ["上\u2028下", "x"]


@pytest.mark.parametrize("name, data, byte", [
    ("blob.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', 24),  # the byte in the file, not in its line
    ("blob.json", b'["a", "\xe4\xb8"]', 7),  # a 3-byte character cut after 2 bytes
    ("blob.md", b"ok\n\xc3(", 3),
])
def test_not_utf8_names_the_file_and_byte(tmp_path, name, data, byte):
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(LmzooError, match=rf"^{re.escape(str(f))}: not UTF-8 text \(.* at byte {byte}\)$"):
        list(read_documents(f))


def test_read_utf8_is_the_one_text_file_reader(tmp_path):
    from lmzoo.data.readers import read_utf8, text_lines

    f = tmp_path / "a.txt"
    f.write_bytes(b"one\r\ntwo\rthree\n\xe2\x80\xa8\n")
    assert read_utf8(f) == "one\ntwo\nthree\n\u2028\n"  # universal newlines, as open() reads
    assert text_lines(read_utf8(f)) == ["one", "two", "three", "\u2028"]
    assert text_lines("a\n\nb") == ["a", "", "b"] and text_lines("") == []
    with pytest.raises(LmzooError, match=r"a folder, expected a text file"):
        read_utf8(tmp_path)
    with pytest.raises(LmzooError, match=r"missing\.txt: no such file"):
        read_utf8(tmp_path / "missing.txt")
