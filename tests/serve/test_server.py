"""``lmzoo serve`` against the official openai client and raw HTTP: every greedy answer equals
``lmzoo.generate`` on the same prompt alone (streamed or not, batched with 15 others or not), usage counts
the tokens, seeds repeat, stop strings cut, Chinese survives byte-level tokens; bad input gets OpenAI's error
shape with the right status; a full queue answers 503 while the accepted requests still come out right, and a
second burst leaves the resident memory where the first did; a client that goes away frees its cache blocks
(the engine's own stats back to idle)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai  # a dev dependency: missing, these tests fail rather than skip
import pytest
import torch

import lmzoo
from tests.serve.conftest import CONTEXT, serving

ROOT = Path(__file__).resolve().parents[2]


# -- references: the same model and tokenizer, run locally ----------------------------------------------
@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return lmzoo.load(tiny_model_dir).eval(), lmzoo.load_tokenizer(tiny_model_dir)


def stops_of(tok, chat: bool) -> list[int]:
    ids = [tok.special_id("eos")]
    return ids + [tok.token_to_id("<|im_end|>")] if chat else ids


def greedy(model, ids: list[int], max_tokens: int, stops: list[int]) -> list[int]:
    """lmzoo.generate alone, cut after the first stop token (which it then pads after)."""
    out = lmzoo.generate(model, torch.tensor([ids]), max_new_tokens=max_tokens, eos_token_id=stops or None)
    out = out[0, len(ids):].tolist()
    cut = next((k + 1 for k, t in enumerate(out) if t in stops), len(out))
    return out[:cut]


def text_of(tok, ids: list[int], stops: list[int]) -> str:
    return tok.decode([t for t in ids if t not in stops], skip_special_tokens=True)


def chat_ids(tok, messages) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=True).ids


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)


def metrics(url: str) -> dict:
    return httpx.get(f"{url}/metrics").json()


def resident_bytes() -> int:
    """This process's resident set (Linux /proc; the server under test runs in a thread of it)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["in_flight"] == 0 and m["running"] == 0 and m["waiting"] == 0 and m["blocks_used"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine is not idle: {m}")
        time.sleep(0.02)


# -- the openai client ------------------------------------------------------------------------------------
def test_chat_streamed_and_not_equals_lmzoo_generate(client, local):
    model, tok = local
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"}]
    stops = stops_of(tok, chat=True)
    prompt = chat_ids(tok, messages)
    ref = greedy(model, prompt, 20, stops)
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny-chat" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text_of(tok, ref, stops)
    assert r.choices[0].finish_reason == ("stop" if ref[-1] in stops else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(prompt), len(ref), len(prompt) + len(ref))
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_completion_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_streamed_and_not_equal_lmzoo_generate(client, local):
    model, tok = local
    stops = stops_of(tok, chat=False)
    prompts = ["hello world, hello", "the cat sat"]
    refs = [greedy(model, tok.encode(p, add_special_tokens=True), 16, stops) for p in prompts]
    r = client.completions.create(model="tiny-chat", prompt=prompts, max_tokens=16, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [text_of(tok, ref, stops) for ref in refs]
    assert r.usage.prompt_tokens == sum(len(tok.encode(p, add_special_tokens=True)) for p in prompts)
    assert r.usage.completion_tokens == sum(len(ref) for ref in refs)
    # token ids as the prompt, streamed: the same text
    ids = tok.encode(prompts[1], add_special_tokens=True)
    chunks = list(client.completions.create(model="tiny-chat", prompt=ids, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[1].text
    assert chunks[-1].choices[0].finish_reason == r.choices[1].finish_reason


def test_n_choices_with_a_seed_repeat(client):
    kw = dict(model="tiny-chat", prompt="the cat", max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(n=2, seed=7, **kw)
    b = client.completions.create(n=2, seed=7, **kw)
    texts = [c.text for c in a.choices]
    assert texts == [c.text for c in b.choices] and texts[0] != texts[1]
    assert a.usage.completion_tokens == 20
    # choice j samples with seed + j: the same draws as a single request with that seed
    for j, seed in enumerate((7, 8)):
        assert client.completions.create(n=1, seed=seed, **kw).choices[0].text == texts[j]


def test_stop_strings_cut_the_text(client, local):
    model, tok = local
    ids = tok.encode("hello world", add_special_tokens=True)
    full = text_of(tok, greedy(model, ids, 30, []), [])
    # a stop string found in the middle of the greedy text (and not earlier), free of replacement characters
    k = next(k for k in range(len(full) // 2, len(full) - 2)
             if "\ufffd" not in full[k:k + 2] and full.find(full[k:k + 2]) == k)
    stop = full[k:k + 2]
    body = dict(model="tiny-chat", prompt="hello world", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(stop=[stop, "never-appears"], **body)
    assert r.choices[0].text == full[:k] and r.choices[0].finish_reason == "stop"
    assert 0 < r.usage.completion_tokens < 30
    chunks = list(client.completions.create(stop=stop, stream=True, **body))
    assert "".join(c.choices[0].text for c in chunks) == full[:k]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids_end_the_choice(client, local):
    """A stop token (here the 5th greedy token, via the extension ``stop_token_ids``) ends the choice inside the
    engine: finish "stop", the token counted in usage but not in the text."""
    model, tok = local
    ids = tok.encode("the cat sat", add_special_tokens=True)
    ref = greedy(model, ids, 16, [])
    stop = ref[4]
    cut = ref.index(stop) + 1
    r = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [stop]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == cut
    assert r.choices[0].text == text_of(tok, ref[:cut - 1], [])


def test_chinese_prompt_round_trips(client, local):
    model, tok = local
    text = "把 5 写成中文数字。你好 世界，龙"
    messages = [{"role": "user", "content": text}]
    prompt = chat_ids(tok, messages)
    stops = stops_of(tok, chat=True)
    ref = greedy(model, prompt, 24, stops)
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=24, temperature=0)
    assert r.usage.prompt_tokens == len(prompt)  # the UTF-8 arrived intact: the same ids
    assert r.choices[0].message.content == text_of(tok, ref, stops)
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    c = client.completions.create(model="tiny-chat", prompt=text, max_tokens=1, temperature=0)
    assert c.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=True))


def test_logprobs_are_the_models(client, local):
    """The chosen tokens' log-probabilities equal log_softmax of one full forward over prompt + answer."""
    model, tok = local
    ids = tok.encode("the cat sat", add_special_tokens=True)
    ref = greedy(model, ids, 8, [])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + ref])).logits[0].float(), -1)  # (T, V)
    expected = [float(logp[len(ids) + j - 1, t]) for j, t in enumerate(ref)]
    r = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=8, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    got = r.choices[0].logprobs.token_logprobs
    assert got == pytest.approx(expected, abs=1e-4)
    assert "".join(r.choices[0].logprobs.tokens) == r.choices[0].text == text_of(tok, ref, [])
    msgs = [{"role": "user", "content": "hello"}]
    c = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=0, extra_body={"ignore_eos": True})
    p = chat_ids(tok, msgs)
    ref = greedy(model, p, 4, [])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + ref])).logits[0].float(), -1)
    assert [e.logprob for e in c.choices[0].logprobs.content] == \
        pytest.approx([float(logp[len(p) + j - 1, t]) for j, t in enumerate(ref)], abs=1e-4)


def test_choice_text_holds_back_split_characters_and_stop_prefixes(local):
    from lmzoo.serve.text import ChoiceText

    _, tok = local
    text = "龙 hello 世界"  # 龙 is not in the tokenizer's training text: three byte tokens
    ids = tok.encode(text)
    ch = ChoiceText(tok, [], [])
    pieces = [ch.feed([t], []) for t in ids] + [ch.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[:2] == ["", ""] and pieces[2] == "龙"  # held until the third byte
    # "lo wo" may start at "lo": held back while it could, cut where it matched
    ch = ChoiceText(tok, ["lo wo"], [])
    pieces = [ch.feed([t], []) for t in tok.encode("hello world")]
    assert "".join(pieces) + ch.finish() == "hel" and ch.stopped


def test_many_concurrent_clients_each_get_their_own_answer(server_url, local):
    model, tok = local
    prompts = ["hello " * k + "the cat" for k in range(16)]  # 16 lengths: padded and batched together
    refs = [text_of(tok, greedy(model, tok.encode(p, add_special_tokens=True), 12, stops_of(tok, False)),
                    stops_of(tok, False)) for p in prompts]
    got = [None] * len(prompts)

    def ask(i):
        c = openai.OpenAI(base_url=f"{server_url}/v1", api_key="x", max_retries=0, timeout=60)
        r = c.completions.create(model="tiny-chat", prompt=prompts[i], max_tokens=12, temperature=0)
        got[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == refs
    assert wait_idle(server_url)["blocks_used"] == 0


# -- raw HTTP: errors ---------------------------------------------------------------------------------------
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [  # (path, body, status, text the message must contain, param)
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON", None),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object", None),
    ("/v1/chat/completions", {"max_tokens": 2}, 400, "'messages' is required", "messages"),
    ("/v1/completions", {"max_tokens": 2}, 400, "'prompt' is required", "prompt"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "must be a non-empty list", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "one of", "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, ">= 1", "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}, 400, "an integer", "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "[0.0, 2.0]", "temperature"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "in [1, 16]", "n"),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, 400, "non-empty string", "stop"),
    ("/v1/chat/completions", {**CHAT, "frobnicate": 1, "zeal": 2}, 400, "'frobnicate', 'zeal'", "frobnicate"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 0.5}, 400, "repetition_penalty", "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400, "no JSON mode",
     "response_format"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "only allowed with",
     "stream_options"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 3}, 400, "must be 0 here", "logprobs"),
    ("/v1/completions", {"prompt": [1, 100000]}, 400, "outside the model's vocabulary", "prompt"),
    ("/v1/completions", {"prompt": [5] * 250, "max_tokens": 10}, 400,
     "the prompt has 250 tokens and max_tokens is 10: together 260, more than the model's context of 256", "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 5, "n": 16}, 400, "asks for 80 sequences", "n"),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": [-1]}, 400, "a list of token ids", "stop_token_ids"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "'gpt-4' does not exist", "model"),
]


@pytest.mark.parametrize("path,body,status,says,param", BAD, ids=[f"{b[2]}-{b[3][:24]}" for b in BAD])
def test_bad_requests_get_openai_errors(server_url, path, body, status, says, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server_url + path, **kw, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and says in err["message"] and err["param"] == param
    assert "Traceback" not in r.text


def test_standard_fields_the_client_sends_are_accepted(server_url):
    body = {**CHAT, "model": "tiny-chat", "user": "u1", "response_format": {"type": "text"}, "stream": False,
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "tools": [], "seed": 1, "n": 1}
    r = httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{server_url}/v1/nope").status_code == 404
    assert httpx.get(f"{server_url}/v1/chat/completions").json()["error"]["message"].startswith("no route GET")


def test_models_health_metrics(server_url, client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert httpx.get(f"{server_url}/v1/models/tiny-chat").json()["max_model_len"] == CONTEXT
    assert httpx.get(f"{server_url}/health").json() == {"status": "ok"}
    page = ROOT / "lmzoo" / "serve" / "static" / "index.html"
    r = httpx.get(f"{server_url}/")
    if page.is_file():
        assert r.status_code == 200 and r.content == page.read_bytes()
        assert r.headers["content-type"].startswith("text/html")
    else:
        assert r.status_code == 404 and "index.html is missing" in r.json()["error"]["message"]
    m = wait_idle(server_url)
    assert m["blocks_total"] > 0 and m["block_size"] == 16 and m["generated_tokens_total"] > 0
    # the same prompt twice: its full blocks come from the prefix cache the second time
    ids = list(range(10, 60))  # 50 tokens: three full blocks of 16
    for _ in range(2):
        httpx.post(f"{server_url}/v1/completions", json={"prompt": ids, "max_tokens": 1}, timeout=30)
    assert wait_idle(server_url)["prefix_cache_hits"] - m["prefix_cache_hits"] == 48


def test_the_chat_template_and_its_stop_ids(tiny_model_dir, tmp_path, capsys):
    """The directory's own template is used as it is; without one, the built-in its vocabulary fits (ChatML
    here), said on stderr. Either way a turn ends at EOS or <|im_end|>."""
    import shutil

    from lmzoo.serve import create_app

    tok = lmzoo.load_tokenizer(tiny_model_dir)
    ends = [tok.special_id("eos"), tok.token_to_id("<|im_end|>")]
    own = create_app(tiny_model_dir).state.served
    assert own.template == tok.chat_template and own.chat_stop_ids == ends and own.eos_ids == ends[:1]
    assert capsys.readouterr().err == ""
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    served = create_app(bare).state.served
    assert "has no chat template; using the built-in 'chatml'" in capsys.readouterr().err
    assert served.chat_stop_ids == ends and served.name == "bare"


def test_without_fastapi_the_error_says_what_to_install(monkeypatch):
    from lmzoo.errors import LmzooError
    from lmzoo.serve import require_server_packages

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    with pytest.raises(LmzooError, match=r"lmzoo serve needs fastapi and uvicorn: pip install 'lmzoo\[serve\]'"):
        require_server_packages()


def test_an_engine_failure_is_an_error_not_a_hang(tiny_model_dir, local):
    """step() raising fails the requests in flight (500 in OpenAI's shape; an error event mid-stream) with no
    traceback sent, frees their blocks, and the server goes on answering right."""
    from lmzoo.generate.continuous import Engine

    class FlakyEngine(Engine):
        fail = 0

        def step(self):
            # only a step with requests in it: a late abort (of the 500's request) makes a step of its own
            if FlakyEngine.fail and self.has_unfinished():
                FlakyEngine.fail -= 1
                raise RuntimeError("boom")
            return super().step()

    model, tok = local
    body = {"prompt": "the cat", "max_tokens": 6, "temperature": 0}
    with serving(tiny_model_dir, engine_cls=FlakyEngine) as url:
        FlakyEngine.fail = 1
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["message"] == "the engine failed: RuntimeError: boom"
        FlakyEngine.fail = 1
        r = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=30)
        events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        assert events[-1]["error"]["type"] == "server_error" and "[DONE]" not in r.text
        assert "Traceback" not in r.text
        assert wait_idle(url)["engine_errors"] == 2
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        ref = greedy(model, tok.encode("the cat", add_special_tokens=True), 6, stops_of(tok, False))
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == text_of(tok, ref, stops_of(tok, False))


def test_chat_without_max_tokens_fills_what_the_cache_leaves(tiny_model_dir, local):
    """A cache of 4 blocks of 16 (64 tokens, less than the 256 context): the default max_tokens is the rest."""
    model, tok = local
    messages = [{"role": "user", "content": "hello world"}]
    prompt, stops = chat_ids(tok, messages), stops_of(tok, chat=True)
    ref = greedy(model, prompt, 64 - len(prompt), stops)
    with serving(tiny_model_dir, num_blocks=4) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "temperature": 0}, timeout=60).json()
        assert r["choices"][0]["message"]["content"] == text_of(tok, ref, stops)
        assert r["usage"]["completion_tokens"] == len(ref)
        assert r["usage"]["total_tokens"] == 64 or r["choices"][0]["finish_reason"] == "stop"
        big = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 100}, timeout=60)
        assert big.status_code == 400 and "paged cache's 64 token slots" in big.json()["error"]["message"]


# -- a key, a small queue, a burst; clients that leave --------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(tiny_model_dir):
    with serving(tiny_model_dir, api_key="sk-test", max_queue=8, max_batch=4) as url:
        yield url


def test_api_key(small_server):
    r = httpx.post(f"{small_server}/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{small_server}/v1/models", headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
    assert httpx.get(f"{small_server}/v1/models", headers={"Authorization": "Bearer sk-test"}).status_code == 200
    assert httpx.get(f"{small_server}/health").status_code == 200  # health and metrics stay open
    c = openai.OpenAI(base_url=f"{small_server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_a_burst_past_the_queue_gets_503_and_the_rest_complete(small_server, local):
    model, tok = local
    prompts = [f"the cat {i % 5}" for i in range(200)]
    refs = {p: text_of(tok, greedy(model, tok.encode(p, add_special_tokens=True), 24, []), [])
            for p in set(prompts)}
    headers = {"Authorization": "Bearer sk-test"}

    async def burst():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60, headers=headers) as c:
            body = lambda p: {"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}  # noqa: E731
            return await asyncio.gather(*[c.post(f"{small_server}/v1/completions", json=body(p)) for p in prompts])

    rss = []
    for _ in range(2):  # the second burst, once the first has set the allocator's high-water mark: no growth
        rs = asyncio.run(burst())
        ok = [(p, r) for p, r in zip(prompts, rs) if r.status_code == 200]
        full = [r for r in rs if r.status_code == 503]
        print(f"burst: {len(ok)} accepted, {len(full)} refused with 503 (queue of 8)")
        assert len(ok) + len(full) == 200 and len(ok) >= 8 and full
        assert all(r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"] for r in full)
        assert all(r.json()["choices"][0]["text"] == refs[p] for p, r in ok)
        m = wait_idle(small_server)
        assert m["requests_rejected"] >= len(full) and m["blocks_used"] == 0
        gc.collect()
        rss.append(resident_bytes())
    print(f"resident memory after each burst: {[f'{r / 2 ** 20:.0f} MiB' for r in rss]}")
    assert rss[1] - rss[0] < 16 * 2 ** 20, rss  # server and clients share this process: idle again, no leak


def test_a_client_leaving_mid_stream_frees_its_sequence(small_server):
    headers = {"Authorization": "Bearer sk-test"}
    before = wait_idle(small_server)
    body = {"prompt": "hello", "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{small_server}/v1/completions", json=body, headers=headers, timeout=30) as r:
        lines = r.iter_lines()
        got = [json.loads(next(line for line in lines if line.startswith("data: "))[6:]) for _ in range(3)]
        assert all(g["object"] == "text_completion" for g in got)
        assert metrics(small_server)["in_flight"] == 1
    after = wait_idle(small_server)  # blocks back, nothing running or waiting
    assert 3 <= after["generated_tokens_total"] - before["generated_tokens_total"] < 240
    # a non-streamed request whose client gives up: aborted too (240 tokens take the engine at least 240
    # steps, well over the 0.05 s the client waits; 0.3 s proved too close on a quiet machine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{small_server}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=0.05)
    done = wait_idle(small_server)
    assert done["generated_tokens_total"] - after["generated_tokens_total"] < 240


# -- the command --------------------------------------------------------------------------------------------
def test_the_command_prints_its_url_serves_and_stops_on_ctrl_c(tiny_model_dir):
    from lmzoo.cli.main import COMMANDS

    # `lmzoo serve` once the entry point lists it; until then the module itself, wrapped as main() wraps it
    script = ("import argparse, sys\nfrom lmzoo.cli import serve\np = argparse.ArgumentParser()\n"
              "serve.add_arguments(p)\ntry:\n    sys.exit(serve.run(p.parse_args(sys.argv[1:])))\n"
              "except KeyboardInterrupt:\n    print('lmzoo: interrupted', file=sys.stderr)\n    sys.exit(130)\n")
    command = ["-m", "lmzoo", "serve"] if "serve" in COMMANDS else ["-c", script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, *command, "--model", str(tiny_model_dir), "--port", "0",
                             "--served-name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("lmzoo serve: 'tiny' at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "tiny"}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 130
        err = proc.stderr.read()
        assert "lmzoo: interrupted" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_command_refuses_bad_options(tiny_model_dir, tmp_path):
    import argparse

    from lmzoo.cli import serve
    from lmzoo.errors import LmzooError

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    with pytest.raises(LmzooError, match="--max-queue must be >= 1, got 0"):
        serve.run(p.parse_args(["--model", str(tiny_model_dir), "--max-queue", "0"]))
    busy = serve.bind("127.0.0.1", 0)
    busy.listen()
    try:
        with pytest.raises(LmzooError, match="is in use"):
            serve.run(p.parse_args(["--model", str(tiny_model_dir), "--port", str(busy.getsockname()[1])]))
    finally:
        busy.close()
    with pytest.raises(LmzooError, match="not a directory"):
        serve.run(p.parse_args(["--model", str(tmp_path / "missing"), "--port", "0"]))
