"""Every loader gives the reference library's ids on the real files, over the bilingual set.

References, each independent of the code under test where one exists:
- LLaMA-2 / ChatGLM2 .model: sentencepiece on the file.
- ChatGLM-6B ice_text.model: sentencepiece on the model as THUDM's icetk tokenizer rebuilds it
  (protobuf edit, str.replace preprocessing, +20,000), written here from their code.
- GPT-2: transformers' GPT2Tokenizer, and tiktoken on the same vocab/merges (another engine).
- BERT: transformers' pure-Python BertTokenizerLegacy, and BertTokenizer.
- Qwen: tiktoken with the regex and specials of Qwen's tokenization_qwen.py, and transformers'
  TikTokenConverter (another engine).
"""

from __future__ import annotations

import base64
import unicodedata

import pytest

import lmzoo
from tests.tokenizers.strings import SPECIAL_LOOKING, TOKENIZERS, bilingual_set, need

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


@pytest.fixture(scope="module")
def texts():
    s = bilingual_set()
    assert len(s) >= 200
    return s


def assert_same(tok, reference, texts, name):
    bad = [t for t in texts if tok.encode(t) != reference(t)]
    assert not bad, f"{name}: {len(bad)} of {len(texts)} differ, e.g. {bad[:3]!r}"


def assert_round_trip(tok, texts, normalize=lambda t: t):
    bad = [t for t in texts if tok.decode(tok.encode(t)) != normalize(t)]
    assert not bad, f"decode(encode(x)) != x for {bad[:3]!r}"


@pytest.mark.parametrize("name", ["llama2", "chatglm2"])
def test_sentencepiece_models_equal_sentencepiece(name, texts):
    import sentencepiece as spm

    path = need(TOKENIZERS / name / "tokenizer.model")
    tok = lmzoo.load_tokenizer(path.parent)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert_same(tok, sp.encode, texts, name)
    assert_round_trip(tok, texts)
    assert tok.encode("Hello  world") == sp.encode("Hello  world")  # transformers' conversion differs here
    # special-looking text: plain sentencepiece never parses it; split_special=False matches that
    for t in SPECIAL_LOOKING:
        assert tok.encode(t, split_special=False) == sp.encode(t)
    assert tok.encode("<s>hi</s>") == [1] + sp.encode("hi") + [2]


def test_llama2_specials_and_vocab():
    tok = lmzoo.load_tokenizer(need(TOKENIZERS / "llama2"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (32000, 1, 2, 0, None)
    assert tok.encode("Hello world", add_special_tokens=True) == [1, 15043, 3186]
    assert tok.decode([1, 15043, 3186], skip_special_tokens=True) == "Hello world"


def test_chatglm2_and_chatglm3_specials():
    path = need(TOKENIZERS / "chatglm2")
    glm2 = lmzoo.load_tokenizer(path)
    assert glm2.flavor == "chatglm2" and glm2.vocab_size == 64789 + 5
    assert glm2.encode("你好", add_special_tokens=True)[:2] == [64790, 64792]  # [gMASK] <sop>
    glm3 = lmzoo.load_tokenizer(path, flavor="chatglm3")
    assert glm3.vocab_size == 64798 and glm3.token_to_id("<|user|>") == 64795
    assert glm3.encode("sophisticated") == glm2.encode("sophisticated")  # "sop" is spelled <sop>


def _icetk_reference(model_path):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2", reason="needs protobuf")
    import sentencepiece as spm

    m = pb.ModelProto()
    m.ParseFromString(model_path.read_bytes())
    for s in ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]:
        m.pieces.append(pb.ModelProto.SentencePiece(piece=s, score=0.0, type=3))
    for s in ["<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]:
        m.pieces.append(pb.ModelProto.SentencePiece(piece=s, score=0.0, type=4))
    m.trainer_spec.byte_fallback = True
    for i in range(256):
        m.pieces.append(pb.ModelProto.SentencePiece(piece=f"<0x{i:02X}>", score=0.0, type=6))
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())

    def encode(text):
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(80, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return [i + 20000 for i in sp.encode(text)]

    return encode


def test_chatglm6b_equals_thudm_icetk_tokenizer(texts):
    path = need(TOKENIZERS / "chatglm-6b" / "ice_text.model")
    tok = lmzoo.load_tokenizer(path.parent)
    assert_same(tok, _icetk_reference(path), texts + ["x" + " " * 85 + "y", "a\t\t b"], "chatglm-6b")
    # 20,000 image tokens + 130,000 text pieces + 8 specials + tab + 79 blanks + 256 bytes
    assert tok.vocab_size == 150344
    assert (tok.token_to_id("[gMASK]"), tok.bos_id, tok.eos_id) == (150001, 150004, 150005)
    assert tok.encode("你好") == [20005, 94874]  # "▁", "你好": sentencepiece ids + 20,000
    later = lmzoo.load_tokenizer(path, image_tokens=0)  # the later release: no shift
    assert later.encode("你好") == [5, 74874] and later.vocab_size == 130344
    assert tok.decode(tok.encode("a  b\n\tc")) == "a  b\n\tc"  # the whitespace pieces come back


def test_chatglm6b_later_release_file_has_no_shift(tmp_path, texts):
    """The later release's ice_text.model holds the 344 added pieces itself and has no image tokens."""
    from lmzoo.tokenizers.sentencepiece_backend import FLAVORS, append_pieces

    path = need(TOKENIZERS / "chatglm-6b" / "ice_text.model")
    later_file = tmp_path / "ice_text.model"
    later_file.write_bytes(append_pieces(path.read_bytes(), FLAVORS["chatglm-6b"].added_pieces, byte_fallback=True))
    later = lmzoo.load_tokenizer(later_file)
    early = lmzoo.load_tokenizer(path, image_tokens=0)
    assert later.vocab_size == early.vocab_size == 130344 and (later.bos_id, later.eos_id) == (130004, 130005)
    assert [later.encode(t) for t in texts[:60]] == [early.encode(t) for t in texts[:60]]
    assert later.encode("x", add_special_tokens=True)[-2:] == [130001, 130004]  # [gMASK] <sop>
    shifted = lmzoo.load_tokenizer(path)
    assert lmzoo.load_tokenizer(shifted.save(tmp_path / "saved")).encode("你好") == [20005, 94874]


def test_gpt2_equals_transformers_and_tiktoken(texts):
    transformers = pytest.importorskip("transformers")
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    d = need(TOKENIZERS / "gpt2")
    tok = lmzoo.load_tokenizer(d)
    ref = transformers.GPT2Tokenizer.from_pretrained(str(d))
    assert_same(tok, lambda t: ref.encode(t, add_special_tokens=False), texts + SPECIAL_LOOKING, "gpt2/transformers")
    ranks = data_gym_to_mergeable_bpe_ranks(str(d / "merges.txt"), str(d / "vocab.json"))
    enc = tiktoken.Encoding("gpt2-ref", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    assert_same(tok, enc.encode_ordinary, texts, "gpt2/tiktoken")
    assert_round_trip(tok, texts)
    assert tok.encode("Hello world") == [15496, 995] and tok.eos_id == 50256 and tok.vocab_size == 50257


def test_bert_equals_transformers(texts):
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    d = need(TOKENIZERS / "bert-base-uncased")
    tok = lmzoo.load_tokenizer(d)
    python_ref = BertTokenizerLegacy(vocab_file=str(d / "vocab.txt"))
    assert_same(tok, lambda t: python_ref.encode(t, add_special_tokens=False), texts, "bert/python")
    fast = transformers.BertTokenizer.from_pretrained(str(d))
    both = texts + SPECIAL_LOOKING
    assert [tok.encode(t, add_special_tokens=True) for t in both] == [fast.encode(t) for t in both]
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.unk_id, tok.mask_id) == (101, 102, 0, 100, 103)


def test_qwen_equals_qwen_tiktoken_reader(texts):
    import tiktoken

    path = need(TOKENIZERS / "qwen" / "qwen.tiktoken")
    tok = lmzoo.load_tokenizer(path.parent)
    ranks = {base64.b64decode(a): int(b) for a, b in (ln.split() for ln in path.read_bytes().splitlines() if ln)}
    ref = tiktoken.Encoding("Qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(QWEN_SPECIALS)})
    nfc = lambda t: unicodedata.normalize("NFC", t)  # noqa: E731 - Qwen's tokenize() normalises first
    assert_same(tok, lambda t: ref.encode(nfc(t), allowed_special="all"), texts + SPECIAL_LOOKING + ["e\u0301"],
                "qwen")
    assert_round_trip(tok, texts, nfc)
    assert (tok.vocab_size, tok.eos_id, tok.token_to_id("<|im_end|>")) == (151851, 151643, 151645)
    assert tok.encode("12345") == [ref.encode_single_token(str(d).encode()) for d in range(1, 6)]  # digit by digit


def test_qwen_equals_transformers_tiktoken_converter(texts):
    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = need(TOKENIZERS / "qwen" / "qwen.tiktoken")
    tok = lmzoo.load_tokenizer(path)
    hf = TikTokenConverter(str(path), pattern=QWEN_PATTERN, extra_special_tokens=QWEN_SPECIALS).converted()
    assert_same(tok, lambda t: hf.encode(unicodedata.normalize("NFC", t), add_special_tokens=False).ids, texts,
                "qwen/converter")


def test_single_files_and_directories_load_alike():
    for d, f in [("llama2", "tokenizer.model"), ("gpt2", "vocab.json"), ("gpt2", "merges.txt"),
                 ("bert-base-uncased", "vocab.txt"), ("qwen", "qwen.tiktoken")]:
        path = need(TOKENIZERS / d / f)
        a, b = lmzoo.load_tokenizer(path), lmzoo.load_tokenizer(path.parent)
        assert a.encode("床前明月光 Hello") == b.encode("床前明月光 Hello") and a.vocab_size == b.vocab_size


def test_tokenizer_json_padding_and_truncation_settings_are_not_applied(tmp_path):
    """A tokenizer.json that pads to 128 (as all-MiniLM-L6-v2's does) must still encode plainly."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    import lmzoo

    hf = HFTokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.enable_padding(pad_id=0, pad_token="[PAD]", length=16)
    hf.enable_truncation(max_length=1)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = lmzoo.load_tokenizer(tmp_path)
    assert tok.encode("hello world") == [2, 3]
