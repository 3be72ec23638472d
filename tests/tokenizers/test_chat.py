"""Chat templates: rendered strings equal transformers' apply_chat_template with the same template; ids
and assistant masks equal the families' own prompt builders (written here from their code, on the
reference libraries) and transformers' return_assistant_tokens_mask."""

from __future__ import annotations

import pytest

import lmzoo
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.tokenizers.chat import BUILTIN_TEMPLATES
from tests.tokenizers.corpus import tiny_corpus
from tests.tokenizers.strings import TOKENIZERS, need

SYSTEM = {"role": "system", "content": "你是一个乐于助人的助手。"}
CHATS = [
    [{"role": "user", "content": "床前明月光的下一句是什么？"}, {"role": "assistant", "content": "疑是地上霜。"}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"},
     {"role": "user", "content": "Translate 'moon' to Chinese."}, {"role": "assistant", "content": "月亮 (yuè liang)"}],
    [{"role": "user", "content": "  spaces around  "}, {"role": "assistant", "content": "  kept?  "},
     {"role": "user", "content": "再见"}],
]


def with_system(chat):
    return [SYSTEM] + chat


@pytest.fixture(scope="module")
def hf_chat_tok():
    """A trained LLaMA-style tokenizer with the ChatML specials, and transformers' view of it."""
    transformers = pytest.importorskip("transformers")
    tok = lmzoo.train_tokenizer("sp-bpe", texts=tiny_corpus(), vocab_size=700,
                                special_tokens=["<|im_start|>", "<|im_end|>", "[gMASK]", "<sop>"])
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend.tok, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>")
    return tok, ref


@pytest.mark.parametrize("name", ["llama2", "chatml", "chatglm2"])
def test_rendering_equals_transformers(hf_chat_tok, name):
    tok, ref = hf_chat_tok
    template = BUILTIN_TEMPLATES[name]
    for chat in CHATS + ([with_system(c) for c in CHATS] if name != "chatglm2" else []):
        for gen in (False, True):
            mine, _ = tok.render_chat(chat, add_generation_prompt=gen, template=name)
            theirs = ref.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=gen)
            assert mine == theirs, (name, chat)


def test_chatglm3_rendering_equals_transformers(hf_chat_tok):
    tok, ref = hf_chat_tok
    for chat in CHATS + [with_system(c) for c in CHATS]:
        mine, _ = tok.render_chat(chat, add_generation_prompt=True, template="chatglm3")
        theirs = ref.apply_chat_template(chat, chat_template=BUILTIN_TEMPLATES["chatglm3"], tokenize=False,
                                         add_generation_prompt=True)
        assert mine == theirs


@pytest.mark.parametrize("name", ["chatml", "llama2"])
def test_ids_and_mask_equal_transformers_assistant_mask(hf_chat_tok, name):
    tok, ref = hf_chat_tok
    for chat in CHATS[:2] + [with_system(CHATS[1])]:
        enc = tok.apply_chat_template(chat, template=name)
        out = ref.apply_chat_template(chat, chat_template=BUILTIN_TEMPLATES[name], return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert enc.ids == out["input_ids"]
        assert enc.assistant_mask == out["assistant_masks"] and sum(enc.assistant_mask) > 0


def prefix_mask(tok, text, spans):
    """Independent of offsets: the tokens between encode(text[:start]) and encode(text[:end])."""
    ids = tok.encode(text)
    mask = [0] * len(ids)
    for s, e in spans:
        a, b = tok.encode(text[:s]), tok.encode(text[:e])
        assert ids[:len(a)] == a and ids[:len(b)] == b, "the span edges are not token edges"
        mask[len(a):len(b)] = [1] * (len(b) - len(a))
    return mask


def test_llama2_equals_meta_prompt_builder():
    import sentencepiece as spm

    path = need(TOKENIZERS / "llama2")
    tok = lmzoo.load_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    for chat in [with_system(CHATS[1]), CHATS[0]]:
        turns = chat[1:] if chat[0]["role"] == "system" else chat
        if chat[0]["role"] == "system":  # Meta: the system prompt joins the first user message
            turns = [{**turns[0], "content": f"<<SYS>>\n{chat[0]['content']}\n<</SYS>>\n\n{turns[0]['content']}"}]\
                + turns[1:]
        ids, mask = [], []
        for user, answer in zip(turns[::2], turns[1::2]):
            head = sp.encode(f"[INST] {user['content'].strip()} [/INST]")
            turn = sp.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ")
            assert turn[:len(head)] == head
            ids += [1] + turn + [2]
            mask += [0] * (1 + len(head)) + [1] * (len(turn) - len(head) + 1)
        enc = tok.apply_chat_template(chat, template="llama2")
        assert enc.ids == ids and enc.assistant_mask == mask


def test_chatml_equals_qwen_segments():
    tok = lmzoo.load_tokenizer(need(TOKENIZERS / "qwen"))
    enc_text = lambda t: tok.backend.enc.encode_ordinary(t)  # noqa: E731 - tiktoken, no specials
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    for chat in [with_system(CHATS[1]), CHATS[2]]:
        ids, mask = [], []
        for m in chat:
            head = [start] + enc_text(m["role"] + "\n")
            body = enc_text(m["content"]) + [end]
            ids += head + body + enc_text("\n")
            mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body) + [0]
        ids += [start] + enc_text("assistant\n")
        mask += [0] * (1 + len(enc_text("assistant\n")))
        out = tok.apply_chat_template(chat, add_generation_prompt=True)  # Qwen's default template: ChatML
        assert out.ids == ids and out.assistant_mask == mask
        assert prefix_mask(tok, out.text, out.spans) == out.assistant_mask
    decomposed = [{"role": "user", "content": "cafe\u0301?"}, {"role": "assistant", "content": "e\u0301te\u0301"}]
    out = tok.apply_chat_template(decomposed)  # Qwen normalises to NFC; the spans follow
    assert tok.decode([i for i, m in zip(out.ids, out.assistant_mask) if m]) == "\u00e9t\u00e9<|im_end|>"


def test_chatglm3_equals_build_chat_input():
    import sentencepiece as spm

    path = need(TOKENIZERS / "chatglm2")
    tok = lmzoo.load_tokenizer(path, flavor="chatglm3")
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    for chat in [with_system(CHATS[1]), CHATS[0]]:
        ids, mask = [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")], [0, 0]
        for k, m in enumerate(chat):  # ChatGLM3: <|role|> + encode(metadata + "\n") + encode(content)
            body = sp.encode("\n") + sp.encode(m["content"])
            if m["role"] == "assistant" and k == len(chat) - 1:
                body += [tok.eos_id]
            ids += [tok.token_to_id(f"<|{m['role']}|>")] + body
            mask += [0] + [int(m["role"] == "assistant")] * len(body)
        out = tok.apply_chat_template(chat)  # the chatglm3 flavor's default template
        assert out.ids == ids and out.assistant_mask == mask
        assert tok.decode(out.ids).startswith("[gMASK]<sop><|")


def test_chatglm2_mask_and_rounds():
    tok = lmzoo.load_tokenizer(need(TOKENIZERS / "chatglm2"))
    out = tok.apply_chat_template(CHATS[1])
    assert out.text.startswith("[gMASK]<sop>[Round 1]\n\n问：Hello!\n\n答：Hi, how can I help?\n\n[Round 2]")
    assert out.text.endswith("答：月亮 (yuè liang)</s>")
    assert out.ids[:2] == [64790, 64792] and out.ids[-1] == tok.eos_id
    assert out.assistant_mask == prefix_mask(tok, out.text, out.spans)
    answer = [i for i, m in zip(out.ids, out.assistant_mask) if m]
    assert tok.decode(answer) == "Hi, how can I help?月亮 (yuè liang)</s>"
    prompt = tok.apply_chat_template(CHATS[0][:1], add_generation_prompt=True)
    assert prompt.text.endswith("答：") and sum(prompt.assistant_mask) == 0


def test_template_from_tokenizer_config_and_fallback_mask(tmp_path):
    tok = lmzoo.train_tokenizer("bpe", texts=tiny_corpus(), vocab_size=500, special_tokens=["<|im_end|>"])
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"  # no generation tag
    tok.chat_template = plain
    back = lmzoo.load_tokenizer(tok.save(tmp_path))
    assert back.chat_template == plain
    out = back.apply_chat_template(CHATS[0])
    assert out.spans == [(out.text.index("疑是地上霜。"), out.text.index("疑是地上霜。") + len("疑是地上霜。"))]
    assert back.decode([i for i, m in zip(out.ids, out.assistant_mask) if m]) == "疑是地上霜。"


def test_template_errors():
    tok = lmzoo.train_tokenizer("bpe", texts=tiny_corpus(), vocab_size=400)
    with pytest.raises(ConfigError, match="no chat template"):
        tok.apply_chat_template(CHATS[0])
    with pytest.raises(ConfigError, match="unknown chat template"):
        tok.apply_chat_template(CHATS[0], template="vicuna")
    with pytest.raises(LmzooError, match="alternating"):
        tok.render_chat([{"role": "assistant", "content": "hi"}], template="llama2")
    with pytest.raises(ConfigError, match="does not compile"):
        tok.render_chat(CHATS[0], template="{% for m in messages %}")


# -- every built-in, multi-turn, Chinese, against transformers; llama3 against Meta's own template ----------

# Meta-Llama-3-8B-Instruct's tokenizer_config.json "chat_template", verbatim (no {% generation %} markers)
META_LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ROUNDS3 = [{"role": "user", "content": "把 305 写成中文数字。"}, {"role": "assistant", "content": "三百零五"},
           {"role": "user", "content": " 再把 42 写成中文数字 "}, {"role": "assistant", "content": " 四十二 "},
           {"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]
ALL_SPECIALS = ["<|im_start|>", "<|im_end|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def all_templates_tok():
    """One trained tokenizer holding every built-in's specials; per template the bos it uses."""
    transformers = pytest.importorskip("transformers")
    base = lmzoo.train_tokenizer("sp-bpe", texts=tiny_corpus(), vocab_size=700, special_tokens=ALL_SPECIALS)

    def pair(bos):
        tok = lmzoo.Tokenizer(base.backend, roles={"bos": bos, "eos": "</s>", "unk": "<unk>"})
        ref = transformers.PreTrainedTokenizerFast(tokenizer_object=base.backend.tok, bos_token=bos,
                                                   eos_token="</s>", unk_token="<unk>")
        return tok, ref
    return pair


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_every_builtin_ids_and_mask_equal_transformers(all_templates_tok, name):
    tok, ref = all_templates_tok("<|begin_of_text|>" if name == "llama3" else "<s>")
    no_system = name in ("chatglm2", "chatglm")
    chats = [ROUNDS3, ROUNDS3[:4]] + ([] if no_system else [with_system(ROUNDS3), with_system(ROUNDS3[:2])])
    for chat in chats:
        enc = tok.apply_chat_template(chat, template=name)
        out = ref.apply_chat_template(chat, chat_template=BUILTIN_TEMPLATES[name], return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert enc.text == ref.apply_chat_template(chat, chat_template=BUILTIN_TEMPLATES[name], tokenize=False)
        assert enc.ids == out["input_ids"]
        assert enc.assistant_mask == out["assistant_masks"]
        # every assistant turn is trained: the mask has one run of ones per answer (ChatGLM-6B: the last
        # answer only; the earlier rounds are the prefix it reads bidirectionally)
        runs = sum(1 for a, b in zip([0] + enc.assistant_mask, enc.assistant_mask) if b and not a)
        assert runs == (1 if name == "chatglm" else sum(m["role"] == "assistant" for m in chat))


def test_llama3_renders_as_metas_template(all_templates_tok):
    tok, ref = all_templates_tok("<|begin_of_text|>")
    for chat in [ROUNDS3, with_system(ROUNDS3), with_system(CHATS[1]), CHATS[2]]:
        for gen in (False, True):
            mine, spans = tok.render_chat(chat, add_generation_prompt=gen, template="llama3")
            assert mine == ref.apply_chat_template(chat, chat_template=META_LLAMA3, tokenize=False,
                                                   add_generation_prompt=gen)
    text, spans = tok.render_chat(with_system(ROUNDS3[:4]), template="llama3")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n你是一个乐于助人的助手。"
                           "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n把 305 写成中文数字。<|eot_id|>")
    assert [text[s:e] for s, e in spans] == ["三百零五<|eot_id|>", "四十二<|eot_id|>"]


def test_choose_template_missing_tokens_and_stops(all_templates_tok):
    from lmzoo.tokenizers.chat import choose_template, missing_tokens, stop_ids

    tok, _ = all_templates_tok("<s>")
    assert choose_template(tok) == "chatml"  # no template of its own, no family default
    assert choose_template(tok, default="llama2") == "llama2"
    assert choose_template(tok, template="llama3", default="llama2") == "llama3"
    own = lmzoo.Tokenizer(tok.backend, roles=tok.roles, chat_template=BUILTIN_TEMPLATES["chatglm3"])
    assert choose_template(own, default="llama2") == BUILTIN_TEMPLATES["chatglm3"]  # the directory's own wins
    assert choose_template(own, template="chatml") == "chatml"  # --template wins over both
    with pytest.raises(ConfigError, match="unknown chat template"):
        choose_template(tok, template="vicuna")
    assert all(missing_tokens(tok, n) == [] for n in BUILTIN_TEMPLATES)
    plain = lmzoo.train_tokenizer("bpe", texts=tiny_corpus(), vocab_size=400)
    assert missing_tokens(plain, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert missing_tokens(plain, "llama3") == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert stop_ids(tok, "llama3") == [tok.eos_id, tok.token_to_id("<|eot_id|>")]
    assert stop_ids(tok, "llama2") == [tok.eos_id]
    assert stop_ids(tok, BUILTIN_TEMPLATES["chatml"]) == [tok.eos_id, tok.token_to_id("<|im_end|>")]  # by source
    assert stop_ids(tok, "{{ messages }}") == [tok.eos_id] and missing_tokens(plain, "{{ messages }}") == []
    # a directory's own ChatML (Qwen's is not the built-in's text) still ends its turns at <|im_end|>
    own_chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    assert stop_ids(tok, own_chatml) == [tok.eos_id, tok.token_to_id("<|im_end|>")]


def test_a_vocabulary_made_for_one_template_names_it(tmp_path):
    from lmzoo.tokenizers.chat import choose_template

    texts = ["你好 hello world"] * 20
    qwen_like = lmzoo.train_tokenizer("bpe", texts=texts, vocab_size=300,
                                      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert choose_template(qwen_like, default="llama2") == "chatml"  # its own tokens say ChatML
    plain = lmzoo.train_tokenizer("bpe", texts=texts, vocab_size=300, special_tokens=["<|endoftext|>"])
    with pytest.raises(ConfigError, match=r"'chatml' writes \['<\|im_start\|>', '<\|im_end\|>'\]"):
        choose_template(plain)  # the fallback, ChatML, cannot be rendered without its tokens


def _chatglm6b_prompt(history, query):
    """ChatGLM-6B's chat() (THUDM's modeling_chatglm.py): the prompt its tokenizer then ends with [gMASK] <sop>."""
    if not history:
        return query
    prompt = ""
    for i, (old_query, response) in enumerate(history):
        prompt += "[Round {}]\n问：{}\n答：{}\n".format(i, old_query, response)
    return prompt + "[Round {}]\n问：{}\n答：".format(len(history), query)


def test_chatglm6b_template_is_the_release_chat_prompt():
    tok = lmzoo.train_tokenizer("bpe", texts=["你好 hello 问答 Round"] * 20, vocab_size=300,
                                special_tokens=["[gMASK]", "<sop>", "<eop>"])
    tok.set_special("eos", "<eop>")
    rounds = [("你好", "你好！"), ("1 + 1 等于几？", "2"), ("再加 3 呢？", "5")]
    for n in (1, 2, 3):
        history, (query, answer) = rounds[: n - 1], rounds[n - 1]
        msgs = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        msgs.append({"role": "user", "content": query})
        text, _ = tok.render_chat(msgs, add_generation_prompt=True, template="chatglm")
        assert text == _chatglm6b_prompt(history, query) + "[gMASK]<sop>"
        full, spans = tok.render_chat(msgs + [{"role": "assistant", "content": answer}], template="chatglm")
        assert full == text + answer + "<eop>"
        assert [full[s:e] for s, e in spans] == [answer + "<eop>"]  # only the last answer is trained: the rest is prefix
