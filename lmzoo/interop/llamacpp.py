"""Run llama.cpp (through the ``llama-cpp-python`` binding) on a GGUF file, in a subprocess.

Tests and benchmarks compare lmzoo with llama.cpp itself. The native library runs in a child
interpreter (this file run by path, a JSON request on stdin, a JSON answer on stdout), so a crash
or an illegal instruction there cannot take the caller with it. The model is loaded with ``logits_all=True`` and an F32 KV cache (``type_k = type_v = GGML_TYPE_F32``: the
default F16 cache costs about 1e-2 of logit precision), and closed before the child exits.

    tokenize(path, texts)               -> [[id, ...], ...]
    logits(path, ids)                   -> np.ndarray (len(ids), n_vocab), float32
    greedy(path, ids, n)                -> the n argmax ids that follow ``ids``
    decode_speed(path, ids, n, n_threads) -> {"tokens_per_s", "seconds", "n_new", "n_prompt", "n_threads"}
    seq2seq_logits(path, enc, dec)      -> np.ndarray (len(dec), n_vocab): an encoder-decoder (T5) file
    seq2seq_greedy(path, enc, n)        -> the n argmax ids after the decoder start token
    run(path, ops)                      -> one child, several of the above (one load)

The binding's ``Llama`` class only decodes; for an encoder-decoder the ``seq2seq_*`` ops call
llama.cpp's ``llama_encode`` on the source ids, then ``llama_decode`` on the decoder ids, which
attend to that encoding (cross-attention), through the low-level API on the same loaded model.

When ``import llama_cpp`` fails (in the child), every call raises ``LlamaCppUnavailable``, whose
message starts with "llama.cpp unavailable: ".
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import numpy as np

if __name__ == "__main__":  # the child runs this file by path: llama_cpp only, no lmzoo (3 s of torch imports)
    LmzooError = ValueError
else:
    from lmzoo.errors import LmzooError


class LlamaCppUnavailable(LmzooError):
    """llama-cpp-python cannot be imported (or its native library cannot load)."""


def available() -> tuple[bool, str]:
    """(True, version) when the child can import llama_cpp, else (False, the reason)."""
    try:
        return True, _call({"ops": [{"op": "version"}]})[0]
    except LlamaCppUnavailable as e:
        return False, str(e)


def run(path, ops: list[dict], n_threads: int = 2, n_ctx: int = 512, timeout: float = 300.0) -> list:
    """Answer ``ops`` (dicts with "op": tokenize | logits | greedy | decode_speed and their arguments)
    with one load of ``path``; the answers in order."""
    return _call({"model": str(path), "n_threads": int(n_threads), "n_ctx": int(n_ctx), "ops": ops}, timeout)


def tokenize(path, texts: list[str], add_bos: bool = False, special: bool = False, **kw) -> list[list[int]]:
    return run(path, [{"op": "tokenize", "texts": list(texts), "add_bos": add_bos, "special": special}], **kw)[0]


def logits(path, ids: list[int], **kw) -> np.ndarray:
    """(len(ids), n_vocab) float32 logits of one forward over ``ids`` (a prompt of token ids)."""
    return _unpack(run(path, [{"op": "logits", "ids": [int(i) for i in ids]}], **kw)[0])


def greedy(path, ids: list[int], n: int, **kw) -> list[int]:
    """The ``n`` ids that greedy (argmax) decoding appends to ``ids``."""
    return run(path, [{"op": "greedy", "ids": [int(i) for i in ids], "n": int(n)}], **kw)[0]


def decode_speed(path, ids: list[int], n: int, n_threads: int = 2, **kw) -> dict:
    """Decode ``n`` new tokens (argmax, one per step) after prefilling ``ids``; the prompt is not timed."""
    return run(path, [{"op": "decode_speed", "ids": [int(i) for i in ids], "n": int(n)}], n_threads=n_threads, **kw)[0]


def seq2seq_logits(path, encoder_ids: list[int], decoder_ids: list[int], **kw) -> np.ndarray:
    """(len(decoder_ids), n_vocab) float32 decoder logits of an encoder-decoder file, the encoder run on
    ``encoder_ids``."""
    op = {"op": "seq2seq_logits", "encoder_ids": [int(i) for i in encoder_ids],
          "decoder_ids": [int(i) for i in decoder_ids]}
    return _unpack(run(path, [op], **kw)[0])


def seq2seq_greedy(path, encoder_ids: list[int], n: int, **kw) -> list[int]:
    """The ``n`` ids greedy decoding writes after the file's decoder start token
    (``<arch>.decoder_start_token_id``)."""
    return run(path, [{"op": "seq2seq_greedy", "encoder_ids": [int(i) for i in encoder_ids], "n": int(n)}], **kw)[0]


def _unpack(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["data"]), dtype=np.float32).reshape(d["shape"])


def _call(request: dict, timeout: float = 300.0):
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(request),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise LmzooError(f"llama.cpp: the child process ran past {timeout:.0f}s") from e
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    answer = json.loads(lines[-1]) if lines else None
    if answer is not None and "unavailable" in answer:
        raise LlamaCppUnavailable(f"llama.cpp unavailable: {answer['unavailable']}")
    if proc.returncode != 0 or answer is None or "error" in answer:
        why = answer["error"] if answer and "error" in answer else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LmzooError(f"llama.cpp failed (exit {proc.returncode}): {why}")
    return answer["results"]


_CHILD = f"import runpy; runpy.run_path({__file__!r}, run_name='__main__')"


# -- the child ------------------------------------------------------------------------------------
def _child(request: dict) -> dict:
    try:
        import llama_cpp
    except Exception as e:  # ImportError, or OSError from a native library that does not load
        return {"unavailable": f"import llama_cpp failed ({type(e).__name__}: {e})"}
    if "model" not in request:
        return {"results": [llama_cpp.__version__]}
    llm = llama_cpp.Llama(model_path=request["model"], logits_all=True, verbose=False, n_threads=request["n_threads"],
                          n_threads_batch=request["n_threads"], n_ctx=request["n_ctx"], n_batch=request["n_ctx"],
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        return {"results": [_op(llm, {**op, "n_threads": request["n_threads"]}) for op in request["ops"]]}
    finally:
        llm.close()


def _op(llm, op: dict):
    kind = op["op"]
    if kind == "tokenize":
        return [llm.tokenize(t.encode("utf-8"), add_bos=op["add_bos"], special=op["special"]) for t in op["texts"]]
    if kind in ("seq2seq_logits", "seq2seq_greedy"):
        return _seq2seq(llm, op)
    llm.reset()
    if kind == "logits":
        llm.eval(op["ids"])
        scores = np.ascontiguousarray(llm.scores[: llm.n_tokens], dtype=np.float32)  # (T, V)
        return {"shape": list(scores.shape), "data": base64.b64encode(scores.tobytes()).decode()}
    if kind in ("greedy", "decode_speed"):
        llm.eval(op["ids"])
        out, start = [], time.perf_counter()
        for _ in range(op["n"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        seconds = time.perf_counter() - start
        if kind == "greedy":
            return out
        # the last eval computed one token nobody reads; n evals after the prompt is what is timed
        return {"tokens_per_s": op["n"] / seconds, "seconds": seconds, "n_new": op["n"], "n_prompt": len(op["ids"]),
                "n_threads": op["n_threads"]}
    raise ValueError(f"unknown op {kind!r}")


def _seq2seq(llm, op: dict):
    import llama_cpp

    ctx, model, batch, n_vocab = llm._ctx.ctx, llm._model.model, llm._batch, llm.n_vocab()
    if not llama_cpp.llama_model_has_encoder(model):
        raise ValueError(f"{op['op']}: the model has no encoder")
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)

    def step(fn, ids, past, every):  # every: logits for every position, else the last only
        batch.set_batch(ids, n_past=past, logits_all=every)
        if fn(ctx, batch.batch) != 0:
            raise RuntimeError(f"{fn.__name__} failed on {len(ids)} tokens")

    step(llama_cpp.llama_encode, op["encoder_ids"], 0, True)
    if op["op"] == "seq2seq_logits":
        dec = op["decoder_ids"]
        step(llama_cpp.llama_decode, dec, 0, True)
        scores = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(dec), n_vocab))  # llama.cpp's buffer
        return {"shape": list(scores.shape), "data": base64.b64encode(scores.tobytes()).decode()}
    start = llama_cpp.llama_model_decoder_start_token(model)
    ids = [start if start >= 0 else llama_cpp.llama_vocab_bos(llama_cpp.llama_model_get_vocab(model))]
    out = []
    for _ in range(op["n"]):
        step(llama_cpp.llama_decode, ids[-1:], len(ids) - 1, False)
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        ids.append(int(np.argmax(last)))
        out.append(ids[-1])
    return out


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        answer = _child(request)
    except Exception as e:  # reported to the parent as one line; the parent raises LmzooError
        answer = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0 if "error" not in answer else 1


if __name__ == "__main__":
    sys.exit(main())
