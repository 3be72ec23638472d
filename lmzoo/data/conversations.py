r"""Conversations out of instruction-tuning files: every record becomes a list of
``{"role": "system" | "user" | "assistant", "content": str}`` messages.

The format is detected from each record's keys (the first that fits, in this order):

| format | keys | becomes |
|---|---|---|
| OpenAI messages | ``messages: [{role, content}]`` | the messages as they are |
| ShareGPT | ``conversations: [{from, value}]``, ``system`` | human/user -> user, gpt/assistant -> assistant |
| Alpaca | ``instruction``, ``output``, ``input``, ``system``, ``history`` | see below |
| prompt / completion | ``prompt``, ``completion``, ``system`` | one round |

(``system``, ``input`` and ``history`` are optional.) An Alpaca record becomes the system message,
the rounds of ``history: [[user, assistant], ...]``, then ``instruction + "\n" + input`` ->
``output``.

These are LLaMA-Factory's conventions (``data/converter.py``): the Alpaca user turn joins the
non-empty ``instruction`` and ``input`` with a newline, and ``history`` holds the earlier rounds.
Tool turns (ShareGPT ``function_call`` / ``observation``, OpenAI ``tool`` or ``tool_calls``) are
not supported and are an error. Where LLaMA-Factory skips a malformed record with a warning, this
raises: a record that cannot be trained on is never silently left out.

A conversation must be: an optional system message first, then user and assistant turns
alternating, starting with user and ending with assistant, every content a string and every
assistant content non-empty. Anything else is an ``LmzooError`` naming the file, the record and
the field (``data.json: record 7: conversations[2].from is 'observation': ...``).

Files: ``.json`` (a list of records), ``.jsonl`` (a record per line), ``.parquet`` and a folder
written by ``datasets``' ``save_to_disk`` (read with pyarrow, as ``readers.read_hf_disk``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from lmzoo.data.readers import _need_pyarrow, read_utf8, utf8_lines
from lmzoo.errors import LmzooError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TOOL_ROLES = ("function_call", "observation", "tool", "function")

Message = dict  # {"role": str, "content": str}


def _string(value, field: str) -> str:
    if not isinstance(value, str):
        raise LmzooError(f"{field} holds {type(value).__name__}, expected a string")
    return value


def _list(value, field: str) -> list:
    if not isinstance(value, list):
        raise LmzooError(f"{field} holds {type(value).__name__}, expected a list")
    return value


def _from_openai(record: dict) -> list[Message]:
    out = []
    for k, m in enumerate(_list(record["messages"], "messages")):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LmzooError(f"messages[{k}] is not a {{role, content}} object")
        if m["role"] in TOOL_ROLES or m.get("tool_calls"):
            raise LmzooError(f"messages[{k}] is a tool turn (role {m['role']!r}); tool calls are not supported")
        out.append({"role": m["role"], "content": _string(m["content"], f"messages[{k}].content")})
    return out


def _from_sharegpt(record: dict) -> list[Message]:
    out = [{"role": "system", "content": _string(record["system"], "system")}] if record.get("system") else []
    for k, m in enumerate(_list(record["conversations"], "conversations")):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise LmzooError(f"conversations[{k}] is not a {{from, value}} object")
        who = m["from"]
        if who in TOOL_ROLES:
            raise LmzooError(f"conversations[{k}].from is {who!r}: tool turns (function_call, observation) are "
                             "not supported")
        if who not in SHAREGPT_ROLES:
            raise LmzooError(f"conversations[{k}].from is {who!r}; expected one of {sorted(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[who], "content": _string(m["value"], f"conversations[{k}].value")})
    return out


def _from_alpaca(record: dict) -> list[Message]:
    out = [{"role": "system", "content": _string(record["system"], "system")}] if record.get("system") else []
    for k, pair in enumerate(_list(record.get("history") or [], "history")):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise LmzooError(f"history[{k}] is not a [user, assistant] pair")
        out += [{"role": "user", "content": _string(pair[0], f"history[{k}][0]")},
                {"role": "assistant", "content": _string(pair[1], f"history[{k}][1]")}]
    query = [_string(record.get(f) or "", f) for f in ("instruction", "input")]
    out += [{"role": "user", "content": "\n".join(q for q in query if q)},
            {"role": "assistant", "content": _string(record["output"], "output")}]
    return out


def _from_pair(record: dict) -> list[Message]:
    out = [{"role": "system", "content": _string(record["system"], "system")}] if record.get("system") else []
    return out + [{"role": "user", "content": _string(record["prompt"], "prompt")},
                  {"role": "assistant", "content": _string(record["completion"], "completion")}]


# name -> (does the record have this format's keys?, record -> messages); tried in order
FORMATS: dict[str, tuple[Callable[[dict], bool], Callable[[dict], list[Message]]]] = {
    "openai": (lambda r: "messages" in r, _from_openai),
    "sharegpt": (lambda r: "conversations" in r, _from_sharegpt),
    "alpaca": (lambda r: "instruction" in r and "output" in r, _from_alpaca),
    "prompt_completion": (lambda r: "prompt" in r and "completion" in r, _from_pair),
}
_EXPECTED = ("messages (OpenAI), conversations (ShareGPT), instruction + output (Alpaca) "
             "or prompt + completion")


def detect_format(record) -> str:
    """The name in ``FORMATS`` of the first format whose keys ``record`` has."""
    if not isinstance(record, dict):
        raise LmzooError(f"a {type(record).__name__}, not an object with {_EXPECTED}")
    for name, (fits, _) in FORMATS.items():
        if fits(record):
            return name
    raise LmzooError(f"fits no format: it has keys {sorted(record)}, expected {_EXPECTED}")


def check_conversation(messages: list[Message]) -> None:
    """Raise an ``LmzooError`` naming the message when ``messages`` is not a trainable conversation."""
    if not messages:
        raise LmzooError("empty conversation (no messages)")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LmzooError(f"message {k} is not a {{role, content}} object")
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise LmzooError("only a system message, no turns")
    for k in range(start, len(messages)):
        m, want = messages[k], "user" if (k - start) % 2 == 0 else "assistant"
        if m["role"] not in ROLES:
            raise LmzooError(f"message {k} has role {m['role']!r}; expected one of {ROLES}")
        if m["role"] != want:
            raise LmzooError(f"message {k} is {m['role']!r} where {want!r} was expected (a system message first, "
                             "then user and assistant alternating, starting with user)")
        if not isinstance(m["content"], str):
            raise LmzooError(f"message {k} content holds {type(m['content']).__name__}, expected a string")
        if want == "assistant" and not m["content"].strip():
            raise LmzooError(f"message {k} is an empty assistant turn")
    if messages[-1]["role"] != "assistant":
        raise LmzooError(f"ends with a {messages[-1]['role']!r} turn; a training conversation ends with the "
                         "assistant")


def to_conversation(record, fmt: str | None = None) -> list[Message]:
    """One record -> its checked messages (``fmt`` forces a format from ``FORMATS``)."""
    if isinstance(record, dict):
        record = {k: v for k, v in record.items() if v is not None}  # Parquet's nulls: a column this row lacks
    if fmt is None:
        fmt = detect_format(record)
    elif fmt not in FORMATS:
        raise LmzooError(f"unknown conversation format {fmt!r}; known: {sorted(FORMATS)}")
    elif not isinstance(record, dict) or not FORMATS[fmt][0](record):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise LmzooError(f"not in the {fmt} format (it has keys {keys})")
    messages = FORMATS[fmt][1](record)
    check_conversation(messages)
    return messages


# -- files -----------------------------------------------------------------------------------


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    try:
        data = json.loads(read_utf8(path))
    except ValueError as e:
        raise LmzooError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise LmzooError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for n, record in enumerate(data):
        yield f"record {n}", record


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    for n, line in enumerate(utf8_lines(path), 1):
        if line.strip():
            try:
                yield f"line {n}", json.loads(line)
            except ValueError as e:
                raise LmzooError(f"{path}: line {n} is not valid JSON ({e})") from e


def _table_records(table, where: str) -> Iterator[tuple[str, object]]:
    for n, record in enumerate(table.to_pylist()):
        yield f"{where}row {n}", record


def _parquet_records(path: Path) -> Iterator[tuple[str, object]]:
    _need_pyarrow(path, "Parquet")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damaged files
        raise LmzooError(f"{path}: not a readable Parquet file ({e})") from e
    yield from _table_records(table, "")


def _hf_disk_records(path: Path, split: str) -> Iterator[tuple[str, object]]:
    pa = _need_pyarrow(path, "a Hugging Face dataset folder")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads(read_utf8(path / "dataset_dict.json"))["splits"]
        if split not in splits:
            raise LmzooError(f"{path}: no split '{split}' (splits: {splits})")
        path = path / split
    if not (path / "state.json").is_file():
        raise LmzooError(f"{path}: not a dataset folder written by save_to_disk (no state.json or dataset_dict.json)")
    for entry in json.loads(read_utf8(path / "state.json"))["_data_files"]:
        arrow = path / entry["filename"]
        try:
            with pa.memory_map(str(arrow), "r") as source:
                table = pa.ipc.open_stream(source).read_all()  # datasets writes the Arrow stream format
        except Exception as e:
            raise LmzooError(f"{arrow}: not a readable Arrow file ({e})") from e
        yield from _table_records(table, f"{entry['filename']} ")


def read_records(path, split: str = "train") -> Iterator[tuple[str, object]]:
    """(where, record) for every record of ``path``: where is "record n" (.json), "line n" (.jsonl)
    or "row n" (.parquet, a ``save_to_disk`` folder; ``split`` picks a ``DatasetDict``'s split)."""
    path = Path(path)
    if not path.exists():
        raise LmzooError(f"{path}: no such file or folder")
    if path.is_dir():
        return _hf_disk_records(path, split)
    suffix = path.suffix.lower()
    readers = {".json": _json_records, ".jsonl": _jsonl_records, ".parquet": _parquet_records}
    if suffix not in readers:
        raise LmzooError(f"{path}: conversations are read from .json, .jsonl, .parquet or a save_to_disk folder, "
                         f"not {suffix or 'a file without a suffix'}")
    return readers[suffix](path)


def read_conversations(path, fmt: str | None = None, split: str = "train") -> list[list[Message]]:
    """Every record of ``path`` as a checked conversation (see the module docstring)."""
    out = []
    for where, record in read_records(path, split):
        try:
            out.append(to_conversation(record, fmt))
        except LmzooError as e:
            raise LmzooError(f"{path}: {where}: {e}") from None
    if not out:
        raise LmzooError(f"{path}: holds no records")
    return out
