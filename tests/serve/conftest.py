"""Fixtures for the server's tests (importable by other tests too):

- ``build_tiny_model_dir(path)``: a random 2-layer LLaMA saved with a byte-level BPE tokenizer that has a
  ChatML chat template and knows some Chinese; ``tiny_model_dir`` is one per session.
- ``serving(model_dir, **create_app_options)``: a context manager that starts ``lmzoo serve``'s app with
  uvicorn on a free 127.0.0.1 port in a background thread and yields its base URL ("http://127.0.0.1:PORT");
  the server stops (and its engine thread with it) on exit. ``server_url`` is one per module.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import lmzoo

TEXTS = ["hello world, hello lmzoo", "the cat sat on the mat", "What is 3 + 4? 7", "把 5 写成中文数字。五",
         "hello world 你好 世界", "0 1 2 3 4 5 6 7 8 9 十 百 千 万 一 二 三"] * 20
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONTEXT = 256


def build_tiny_model_dir(path, seed: int = 0) -> Path:
    from lmzoo.models.llama.config import LlamaConfig

    tok = lmzoo.train_tokenizer("bpe", texts=TEXTS, vocab_size=400, special_tokens=SPECIALS)
    for role, token in (("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>")):
        tok.set_special(role, token)
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_positions=CONTEXT, eos_token_id=tok.special_id("eos"), bos_token_id=tok.special_id("bos"))
    return lmzoo.save(lmzoo.build(cfg).eval(), Path(path), tokenizer=tok)


@contextmanager
def serving(model_dir, **options):
    """Start the server on a free port; yield its base URL; stop it (``options``: ``create_app``'s)."""
    import uvicorn

    from lmzoo.cli.serve import bind
    from lmzoo.serve import create_app

    app = create_app(model_dir, **options)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="module")
def server_url(tiny_model_dir):
    with serving(tiny_model_dir, max_batch=8, max_queue=64) as url:
        yield url
