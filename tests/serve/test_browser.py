"""The chat page (lmzoo/serve/static/index.html) in a real headless Chromium, against a real `lmzoo serve`.

Chromium is driven over the DevTools protocol directly (JSON commands on a websocket: Page.navigate,
Runtime.evaluate, Input.*), since Playwright's browser download cannot be had here. The page's answers are
checked against the server's own non-streamed answer to the same request (greedy, temperature 0 set in the
page's field), so a lost, doubled or mis-decoded piece of the stream, or a turn missing from the history,
shows as a different text. Skips when there is no Chromium binary (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.serve.conftest import serving

websocket = pytest.importorskip("websocket", reason="websocket-client is not installed (pip install websocket-client)")

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
MAX_TOKENS = 12


class Browser:
    """A headless Chromium and its one tab, driven over the DevTools protocol."""

    def __init__(self, binary: str, profile) -> None:
        self.log = open(profile / "chromium.log", "wb")
        # a session of its own: the launcher script, the browser and its helper processes go down together
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-sandbox",
             "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
             "--disable-dev-shm-usage", "--disable-background-networking", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.ws, self.next_id, self.exceptions = None, 0, []
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 20
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):  # port, then the browser path
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not start: {(profile / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            tab = next(t for t in json.load(r) if t["type"] == "page")
        # no Origin header: Chromium refuses DevTools websockets from origins not allowed on its command line
        self.ws = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=20, suppress_origin=True)
        self.call("Runtime.enable")  # to hear of uncaught exceptions on the page

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(msg["params"]["exceptionDetails"])
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def js(self, expression: str):
        """The value of a JavaScript expression on the page (awaited when it is a promise)."""
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression!r} threw: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression!r}; page: {self.js('document.body.innerText')!r}")
            time.sleep(0.05)
        return value

    def type_into(self, selector: str, text: str) -> None:
        """Focus a field and insert text as a keyboard (or an IME committing Chinese) does."""
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        x, y = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                       " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def press_enter(self) -> None:
        self.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13,
                  text="\r")
        self.call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def close(self) -> None:
        try:
            if self.ws is not None:
                self.ws.close()
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
            self.log.close()


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium binary (chromium, chromium-browser or google-chrome) on PATH; "
                    "Debian: apt-get install chromium")
    b = Browser(CHROMIUM, tmp_path)
    try:
        yield b
    finally:
        b.close()


def _post(base: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _answer(base: str, messages: list[dict]) -> str:
    status, body = _post(base, {"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


# Watchers the test puts on the page: window.sent, every request body the page posted (fetch wrapped), and
# window.shown, every text an answer's .content showed, in order: each assignment of its text is one mutation
# record (the new text node), so no step is lost however the observer's callbacks are batched.
WATCH = """(() => {
  window.shown = [];
  window.sent = [];  // what the page posted to v1/chat/completions: headers and body
  const fetch = window.fetch;
  window.fetch = (url, init) => {
    if (String(url).endsWith("chat/completions")) window.sent.push({ headers: init.headers, body: JSON.parse(init.body) });
    return fetch(url, init);
  };
  new MutationObserver((records) => {
    for (const r of records)
      if (r.target.classList?.contains("content"))
        for (const n of r.addedNodes) if (n.nodeType === Node.TEXT_NODE) window.shown.push(n.data);
  }).observe(document.getElementById("messages"), { childList: true, subtree: true });
})()"""

LAST = "[...document.querySelectorAll('#messages .msg.assistant')].at(-1)"


def _finished_answer(b: Browser, n_answers: int) -> str:
    b.wait_for(f"document.querySelectorAll('#messages .msg.assistant').length === {n_answers} && "
               f"{LAST}.dataset.state !== 'streaming'")
    assert b.js(f"{LAST}.dataset.state") == "done", b.js("document.body.innerText")
    return b.js(f"{LAST}.querySelector('.content').textContent")


def _open(b: Browser, url: str) -> None:
    b.navigate(url + "/")
    b.wait_for("document.getElementById('model').options.length > 0")
    b.js(WATCH)
    b.js("""(() => { for (const [id, v] of [["temperature", "0"], ["max_tokens", "%d"], ["system", ""]]) {
           const el = document.getElementById(id); el.value = v; el.dispatchEvent(new Event("change")); } })()"""
         % MAX_TOKENS)


def _set(b: Browser, field: str, value: str) -> None:
    b.js(f"document.getElementById({json.dumps(field)}).value = {json.dumps(value)}")


def _last_sent(b: Browser) -> dict:
    return b.js("window.sent.at(-1).body")


def test_chat_page_streams_multi_turn_answers(server_url, browser):
    b = browser
    _open(b, server_url)
    with urllib.request.urlopen(server_url + "/v1/models", timeout=10) as r:
        model_ids = [m["id"] for m in json.load(r)["data"]]
    assert b.js("[...document.querySelectorAll('#model option')].map((o) => o.value)") == model_ids
    assert b.js("document.characterSet") == "UTF-8"

    # turn 1: Chinese typed, sent with a click; streamed, and equal to the server's non-streamed answer
    first = "你好，请介绍一下你自己"
    b.type_into("#message", first)
    assert b.js("document.getElementById('message').value") == first
    b.click("#send")
    answer1 = _finished_answer(b, 1)
    history = [{"role": "user", "content": first}]
    sent = _last_sent(b)
    assert (sent["messages"], sent["stream"], sent["temperature"], sent["max_tokens"]) == (history, True, 0, MAX_TOKENS)
    assert sent["model"] == model_ids[0]
    assert answer1 == _answer(server_url, history)
    assert answer1, "the tiny model answered nothing: the page's text would prove nothing"
    shown = b.js("window.shown")
    assert len(shown) >= 2, f"the answer appeared in one piece, not as it streamed: {shown}"
    assert all(x and y.startswith(x) and len(y) > len(x) for x, y in zip(shown, shown[1:])), shown
    assert shown[-1] == answer1
    assert b.js("document.querySelector('#messages .msg.user').textContent") == first
    assert b.js("document.getElementById('message').value") == ""

    # turn 2, sent with Enter: the whole conversation goes (3 messages), and the answer is the one for them
    second = "再说一遍 (again)"
    b.type_into("#message", second)
    b.press_enter()
    answer2 = _finished_answer(b, 2)
    history += [{"role": "assistant", "content": answer1}, {"role": "user", "content": second}]
    assert _last_sent(b)["messages"] == history
    assert answer2 == _answer(server_url, history)

    # a refused request: the server's OpenAI-shaped error message shows, the turn leaves the conversation
    _set(b, "max_tokens", "0")
    b.type_into("#message", "错误")
    b.click("#send")
    status, err = _post(server_url, {"messages": history + [{"role": "user", "content": "错误"}], "max_tokens": 0})
    assert status == 400
    assert b.wait_for("document.querySelector('#messages .msg.error')?.textContent") == err["error"]["message"]
    assert b.js("document.getElementById('message').value") == "错误"  # given back, to send again
    assert b.js("document.querySelectorAll('#messages .msg.assistant').length") == 2

    # Stop pressed at once: the fetch is aborted, no error shows, and the turn leaves the conversation
    _set(b, "max_tokens", str(MAX_TOKENS))
    b.js("document.getElementById('send').click(); document.getElementById('stop').click()")
    b.wait_for("document.getElementById('stop').hidden")
    assert b.js("document.querySelectorAll('#messages .msg.error').length") == 1
    assert b.js("document.querySelectorAll('#messages .msg.assistant').length") == 2  # the empty answer went
    assert not b.js("document.getElementById('send').disabled")

    # turn 3 with a system prompt: system + the two answered turns + the new message
    _set(b, "system", "You are terse.")
    _set(b, "message", "")
    b.type_into("#message", "第三")
    b.click("#send")
    answer3 = _finished_answer(b, 3)
    history = [{"role": "system", "content": "You are terse."}, *history,
               {"role": "assistant", "content": answer2}, {"role": "user", "content": "第三"}]
    assert _last_sent(b)["messages"] == history
    assert answer3 == _answer(server_url, history)
    assert b.exceptions == [], b.exceptions


def test_chat_page_api_key(tiny_model_dir, browser):
    """With a key on the server, the page shows the 401 until the key is typed, then sends it as Bearer."""
    b = browser
    with serving(tiny_model_dir, api_key="sk-test-key") as url:
        b.navigate(url + "/")
        assert "v1/models" in b.wait_for("document.getElementById('status').textContent.includes('v1/models') && "
                                         "document.getElementById('status').textContent")
        b.js(WATCH)
        _set(b, "temperature", "0")
        _set(b, "max_tokens", str(MAX_TOKENS))
        b.type_into("#message", "hello")
        b.click("#send")
        status, err = _post(url, {"messages": [{"role": "user", "content": "hello"}]})
        assert status == 401
        assert b.wait_for("document.querySelector('#messages .msg.error')?.textContent") == err["error"]["message"]
        assert b.js("document.querySelector('#messages .msg.user').classList.contains('unsent')")

        b.type_into("#api_key", "sk-test-key")
        b.js("document.getElementById('api_key').dispatchEvent(new Event('change'))")
        b.wait_for("document.getElementById('model').options[0].value !== ''")  # the list came once the key went
        b.click("#send")  # the message was given back to the box
        answer = _finished_answer(b, 1)
        assert b.js("window.sent.at(-1).headers.Authorization") == "Bearer sk-test-key"
        req = urllib.request.Request(url + "/v1/chat/completions", headers={
            "Content-Type": "application/json", "Authorization": "Bearer sk-test-key"}, data=json.dumps(
            {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": MAX_TOKENS}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            assert answer == json.load(r)["choices"][0]["message"]["content"]
    assert b.exceptions == [], b.exceptions


def test_page_sse_reader_keeps_split_characters_whole(server_url, browser):
    """The page's SSE reader fed one byte at a time: a Chinese character cut inside its UTF-8 bytes stays whole,
    "\\r\\n" cut in two is one line end, and an event without its last blank line still counts at the end."""
    b = browser
    b.navigate(server_url + "/")
    events = b.js("""(async () => {
      const bytes = new TextEncoder().encode(
        'data: {"choices":[{"delta":{"content":"你好"}}]}\\r\\n\\r\\n: a comment\\n\\ndata:[DONE]');
      const body = new ReadableStream({ start(c) { for (const x of bytes) c.enqueue(new Uint8Array([x])); c.close(); } });
      const out = [];
      for await (const data of sseData(body)) out.push(data);
      return out;
    })()""")
    assert events == ['{"choices":[{"delta":{"content":"你好"}}]}', "[DONE]"]
