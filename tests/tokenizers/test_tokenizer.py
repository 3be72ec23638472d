"""The shared Tokenizer behaviour: batches, padding, truncation, offsets, saving, and clear errors."""

from __future__ import annotations

import pytest
import torch

import lmzoo
from lmzoo.errors import ConfigError, LmzooError
from tests.tokenizers.corpus import tiny_corpus
from tests.tokenizers.strings import TOKENIZERS, need

TEXTS = ["床前明月光", "To be, or not to be: that is the question.", "", "你好 world 😀"]


@pytest.fixture(scope="module")
def llama_like():
    return lmzoo.train_tokenizer("sp-bpe", texts=tiny_corpus(), vocab_size=600)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_and_truncation_match_transformers(llama_like, side):
    transformers = pytest.importorskip("transformers")
    tok = llama_like
    tok.set_special("pad", "</s>")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend.tok, bos_token="<s>", eos_token="</s>",
                                               pad_token="</s>", unk_token="<unk>")
    for kw in [dict(), dict(truncation=True, max_length=6), dict(padding="max_length", max_length=24)]:
        for specials in (False, True):
            mine = tok(TEXTS, add_special_tokens=specials, padding_side=side, **kw)
            theirs = ref(TEXTS, add_special_tokens=specials, padding=kw.get("padding", True), padding_side=side,
                         truncation=kw.get("truncation", False), max_length=kw.get("max_length"))
            assert mine.input_ids == theirs["input_ids"], (kw, specials)
            assert mine.attention_mask == theirs["attention_mask"], (kw, specials)
    tok.set_special("pad", None)


def test_padding_values_and_tensors(llama_like):
    tok = llama_like
    with pytest.raises(LmzooError, match="no pad token"):
        tok(TEXTS)
    tok.set_special("pad", "<unk>")
    batch = tok(TEXTS, add_special_tokens=True, padding_side="left", return_tensors="pt", pad_to_multiple_of=8)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.long and ids.shape[1] % 8 == 0
    for row, m, text in zip(ids.tolist(), mask.tolist(), TEXTS):
        n = sum(m)
        assert row[len(row) - n:] == tok.encode(text, add_special_tokens=True)  # left: real tokens at the end
        assert row[:len(row) - n] == [tok.pad_id] * (len(row) - n) and m == [0] * (len(row) - n) + [1] * n
    assert tok(["ab", "abc"], padding=False).input_ids == [tok.encode("ab"), tok.encode("abc")]
    tok.set_special("pad", None)


def test_truncation_keeps_special_tokens_and_side(llama_like):
    tok = llama_like
    full = tok.encode(TEXTS[1])
    right = tok([TEXTS[1]], add_special_tokens=True, truncation=True, max_length=5, padding=False).input_ids[0]
    left = tok([TEXTS[1]], add_special_tokens=True, truncation=True, max_length=5, padding=False,
               truncation_side="left").input_ids[0]
    assert right == [tok.bos_id] + full[:4] and left == [tok.bos_id] + full[-4:]


def test_offsets_cover_the_text():
    tok = lmzoo.load_tokenizer(need(TOKENIZERS / "llama2"))
    text = "Hi  你好😀\n x"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert "".join(text[s:e] for s, e in dict.fromkeys(offsets)) == text  # byte pieces share their character


def test_save_and_reload_every_backend(tmp_path):
    for name in ["llama2", "qwen", "chatglm2", "gpt2"]:
        tok = lmzoo.load_tokenizer(need(TOKENIZERS / name))
        back = lmzoo.load_tokenizer(tok.save(tmp_path / name))
        s = "床前明月光 Hello <|im_end|> world"
        assert back.encode(s) == tok.encode(s) and back.roles == tok.roles and back.flavor == tok.flavor
        assert back.encode(s, add_special_tokens=True) == tok.encode(s, add_special_tokens=True)


def test_broken_inputs_raise_clear_errors(tmp_path):
    bad_model = tmp_path / "broken.model"
    bad_model.write_bytes(b"\x00\x01 definitely not a protobuf" * 10)
    with pytest.raises(ConfigError, match="broken.model.*SentencePiece"):
        lmzoo.load_tokenizer(bad_model)
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "vocab.json").write_text('{"a": 0, "b": 1}')
    with pytest.raises(ConfigError, match="merges.txt"):
        lmzoo.load_tokenizer(tmp_path / "gpt" / "vocab.json")
    with pytest.raises(ConfigError, match="no tokenizer here"):
        lmzoo.load_tokenizer(tmp_path / "gpt")  # a directory with vocab.json alone is no GPT-2 tokenizer
    (tmp_path / "x.tiktoken").write_text("not base64 !!\n")
    with pytest.raises(ConfigError, match="x.tiktoken:1"):
        lmzoo.load_tokenizer(tmp_path / "x.tiktoken", pattern=r"\w+")
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(ConfigError, match="tokenizer.json"):
        lmzoo.load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match="no such file"):
        lmzoo.load_tokenizer(tmp_path / "missing")


def test_unknown_tiktoken_file_needs_its_pattern(tmp_path):
    path = tmp_path / "mine.tiktoken"
    path.write_text("YQ== 0\nYg== 1\nYWI= 2\n")  # a, b, ab
    with pytest.raises(ConfigError, match="pattern="):
        lmzoo.load_tokenizer(path)
    tok = lmzoo.load_tokenizer(path, pattern=r"[a-z]+|\s", special_tokens={"<eos>": 3})
    assert tok.encode("abab<eos>") == [2, 2, 3] and tok.vocab_size == 4


def test_bad_ids_and_roles(llama_like):
    with pytest.raises(LmzooError, match="outside the vocabulary"):
        llama_like.decode([10**6])
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        llama_like.set_special("pad", "<no-such-token>")


ALIASES = [(f"{role}_token_id", f"{role}_id", f"{role}_token") for role in
           ("bos", "eos", "unk", "pad", "cls", "sep", "mask")]


def test_transformers_special_token_names(tmp_path):
    """tok.eos_token_id etc. are tok.eos_id etc., and what transformers gives for the same files."""
    transformers = pytest.importorskip("transformers")
    tok = lmzoo.train_tokenizer("wordpiece", texts=tiny_corpus(), vocab_size=300)  # has unk/pad/cls/sep/mask
    tok.set_special("bos", "[CLS]")
    tok.set_special("eos", "[SEP]")
    ref = transformers.AutoTokenizer.from_pretrained(str(tok.save(tmp_path / "wp")))
    for hf_name, lmzoo_name, token_name in ALIASES:
        assert getattr(tok, hf_name) == getattr(tok, lmzoo_name) == getattr(ref, hf_name), hf_name
        assert getattr(tok, token_name) == getattr(ref, token_name), token_name
    assert (tok.unk_token_id, tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id,
            tok.bos_token_id, tok.eos_token_id) == (1, 0, 2, 3, 4, 2, 3)  # the wordpiece recipe's specials


def test_transformers_special_token_names_on_gpt2():
    transformers = pytest.importorskip("transformers")
    gpt2 = lmzoo.load_tokenizer(need(TOKENIZERS / "gpt2"))
    ref = transformers.GPT2Tokenizer.from_pretrained(str(TOKENIZERS / "gpt2"))
    assert (gpt2.bos_token_id, gpt2.eos_token_id, gpt2.unk_token_id, gpt2.pad_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.unk_token_id, ref.pad_token_id) == (50256, 50256, 50256, None)
