"""The tokenizer inside a GGUF file: what llama.cpp's converter writes (``tokenizer.ggml.*``) and
lmzoo's reading of it back.

Byte-level BPE goes as ``gpt2`` with its merges and a pre-tokenizer name llama.cpp knows (``gpt-2``
unless the architecture names another), SentencePiece-style byte-fallback BPE
(``lmzoo.train_tokenizer("sp-bpe")``, the speedrun's) and SentencePiece ``.model`` files as ``llama``
with scores and token types. Anything else is refused before a byte is written.
"""

from __future__ import annotations

import json

from lmzoo.errors import ConfigError


def _gguf():
    import gguf

    return gguf


def _field(reader, key, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def vocab_writer(tok, n_vocab: int, bpe_pre: str = "gpt-2"):
    """A function that writes ``tok`` into a GGUFWriter; raises (before anything is written) when
    llama.cpp cannot express it."""
    g = _gguf()
    TT = g.TokenType
    n = tok.vocab_size
    if n > n_vocab:
        raise ConfigError(f"gguf export: the tokenizer has {n} tokens, more than the model's vocab_size {n_vocab}")
    specials = set(tok.special_tokens.values())
    kind = getattr(tok.backend, "kind", None)
    if kind == "tokenizers":
        spec = json.loads(tok.backend.tok.to_str())
        model, pre, norm = spec["model"], spec.get("pre_tokenizer") or {}, spec.get("normalizer")
        added = {a["id"]: a for a in spec.get("added_tokens", [])}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if model["type"] == "BPE" and pre.get("type") == "ByteLevel" and norm is None:
            if pre.get("add_prefix_space") or not pre.get("use_regex", True):
                raise ConfigError("gguf export: a ByteLevel pre-tokenizer with add_prefix_space or without the "
                                  "GPT-2 regex has no llama.cpp pre-tokenizer")
            tokens = [tok.id_to_token(i) for i in range(n)]
            types = [TT.CONTROL if i in specials else TT.USER_DEFINED if i in added else TT.NORMAL for i in range(n)]
            return _writer("gpt2", bpe_pre, tok, tokens, types, n_vocab, merges=merges)
        if model["type"] == "BPE" and model.get("byte_fallback") and _is_metaspace(norm):
            rank = {m.replace(" ", ""): k for k, m in enumerate(merges)}  # token -> the merge that made it
            tokens = [tok.id_to_token(i) for i in range(n)]
            # llama.cpp's SentencePiece tokenizer merges the adjacent pair with the highest score, so a
            # token's score is minus its merge rank: the earliest merge wins, as in BPE
            scores = [-1000.0 if i in specials else -float(rank.get(t, 0)) for i, t in enumerate(tokens)]
            types = [_sp_type(i, t, specials, tok.unk_id) for i, t in enumerate(tokens)]
            return _writer("llama", "default", tok, tokens, types, n_vocab, scores=scores)
        raise ConfigError(f"gguf export: tokenizer {tok.name} ({model['type']}, pre-tokenizer {pre.get('type')}) "
                          "cannot be expressed in GGUF; supported: byte-level BPE (lmzoo's 'bpe'), byte-fallback "
                          "SentencePiece-style BPE ('sp-bpe'), SentencePiece .model files")
    if kind == "sentencepiece" and tok.backend.offset == 0 and not tok.backend.extra:
        sp = tok.backend.sp
        tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        scores = [float(sp.get_score(i)) for i in range(len(tokens))]
        types = [TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i) else TT.BYTE if sp.is_byte(i)
                 else TT.UNUSED if sp.is_unused(i) else TT.NORMAL for i in range(len(tokens))]
        return _writer("llama", "default", tok, tokens, types, n_vocab, scores=scores)
    raise ConfigError(f"gguf export: tokenizer {tok.name} (engine {kind}) cannot be expressed in GGUF")


def _is_metaspace(norm) -> bool:
    """lmzoo's sp-bpe normalizer: Prepend("▁") then Replace(" ", "▁"): SentencePiece's add_dummy_prefix."""
    subs = (norm or {}).get("normalizers", [])
    return any(s.get("type") == "Prepend" and s.get("prepend") == "▁" for s in subs)


def _sp_type(i, t, specials, unk):
    TT = _gguf().TokenType
    if i == unk:
        return TT.UNKNOWN
    if i in specials:
        return TT.CONTROL
    if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
        return TT.BYTE
    return TT.NORMAL


def _writer(model, pre, tok, tokens, types, n_vocab, merges=None, scores=None):
    TT = _gguf().TokenType
    pad = n_vocab - len(tokens)  # a model padded past its tokenizer: unused tokens, as the converter writes
    tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types = [int(t) for t in types] + [int(TT.UNUSED)] * pad
    scores = None if scores is None else scores + [-1000.0] * pad

    def write(w):
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        if scores is not None:
            w.add_token_scores(scores)
        if merges is not None:
            w.add_token_merges(merges)
        for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                          ("pad", w.add_pad_token_id)):
            if tok.special_id(role) is not None:
                add(tok.special_id(role))
        w.add_add_bos_token(bool(tok.bos_id is not None and tok.prefix_ids[:1] == [tok.bos_id]))
        w.add_add_eos_token(bool(tok.eos_id is not None and tok.suffix_ids[-1:] == [tok.eos_id]))
        if model == "llama":
            w.add_add_space_prefix(True)
        if tok.chat_template:
            w.add_chat_template(tok.chat_template)

    return write


def read_tokenizer(r):
    from lmzoo.tokenizers import Tokenizer
    from lmzoo.tokenizers.backends import TokenizersBackend

    if _field(r, "tokenizer.ggml.model") != "gpt2":
        return None
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, pre_tokenizers, processors

    TT = _gguf().TokenType
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != TT.UNUSED}
    hf = HF(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i in range(len(tokens)) if types[i] == TT.CONTROL])
    roles = {role: tokens[i] for role in ("bos", "eos", "unk", "pad")
             if (i := _field(r, f"tokenizer.ggml.{role}_token_id")) is not None}
    prefix = [roles["bos"]] if _field(r, "tokenizer.ggml.add_bos_token") and "bos" in roles else []
    return Tokenizer(TokenizersBackend(hf, "<gguf>"), roles=roles, prefix=prefix,
                     chat_template=_field(r, "tokenizer.chat_template"), name="gguf-gpt2")
