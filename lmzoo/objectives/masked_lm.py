"""BERT's pretraining objective (Devlin et al. 2019, section 3.1 and appendix A.1): masked LM + next
sentence prediction.

Masked LM: 15% of the (non-special, non-pad) positions of each sequence are chosen, as BERT's
``create_pretraining_data.py`` does it: round(15% · candidates) positions drawn without
replacement, at least one. A chosen token becomes

    [MASK] with probability 0.8,  a random token with probability 0.1,  itself with probability 0.1

and is a target; every other position has label -100. The loss is the cross-entropy over targets.

Next sentence prediction: a pair "[CLS] A [SEP] B [SEP]" with B the text that really follows A
(label 0, IsNext) or, half of the time, text from another row of the batch (label 1, NotNext);
token_type_ids are 0 over "[CLS] A [SEP]" and 1 over "B [SEP]". ``nsp_pairs`` builds them from
packed rows (the stream order is the corpus order, so a row's continuation is its next text).

    L = CE_MLM + CE_NSP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmzoo.errors import LmzooError


def mask_tokens(input_ids: torch.Tensor, *, mask_id: int, vocab_size: int, generator: torch.Generator,
                prob: float = 0.15, special_ids=(), attention_mask: torch.Tensor | None = None,
                replace: tuple[float, float] = (0.8, 0.1)) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels): BERT masking of (B, T) ids. ``replace`` = (P[MASK], P[random]); the rest stay."""
    B, T = input_ids.shape
    candidate = torch.ones_like(input_ids, dtype=torch.bool)
    for s in special_ids:
        candidate &= input_ids != s
    if attention_mask is not None:
        candidate &= attention_mask.bool()
    # exactly round(prob · candidates) per row: rank random keys, keep the smallest among candidates
    keys = torch.rand(B, T, generator=generator).masked_fill(~candidate, 2.0)
    n_pick = (candidate.sum(-1).float() * prob).round().clamp(min=1).long()  # (B,)
    n_pick = torch.minimum(n_pick, candidate.sum(-1))
    rank = keys.argsort(-1).argsort(-1)  # (B, T) rank of each position's key in its row
    chosen = rank < n_pick[:, None]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    u = torch.rand(B, T, generator=generator)
    to_mask = chosen & (u < replace[0])
    to_random = chosen & (u >= replace[0]) & (u < replace[0] + replace[1])
    random_ids = torch.randint(vocab_size, (B, T), generator=generator)
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


def nsp_pairs(rows: torch.Tensor, *, cls_id: int, sep_id: int, generator: torch.Generator,
              not_next_prob: float = 0.5) -> dict[str, torch.Tensor]:
    """Sentence pairs from (B, T) consecutive text rows, each output row T tokens long:
    [CLS] A [SEP] B [SEP] with |A| drawn uniformly in [1, T-4]; B continues A (label 0) or, with
    ``not_next_prob``, is the same stretch of another row (label 1)."""
    B, T = rows.shape
    if T < 5:
        raise LmzooError(f"nsp_pairs: rows of {T} tokens leave no room for [CLS] A [SEP] B [SEP]")
    if B < 2:
        raise LmzooError("nsp_pairs: NotNext pairs take B from another row; a batch needs at least 2 rows")
    n_b_total = T - 3
    a_len = torch.randint(1, n_b_total, (B,), generator=generator)  # (B,) in [1, T-4]
    not_next = torch.rand(B, generator=generator) < not_next_prob
    other = (torch.arange(B) + torch.randint(1, B, (B,), generator=generator)) % B  # another row, never itself
    out = torch.empty(B, T, dtype=rows.dtype)
    types = torch.zeros(B, T, dtype=torch.long)
    for i in range(B):
        a = int(a_len[i])
        src = int(other[i]) if bool(not_next[i]) else i
        seg_a, seg_b = rows[i, :a], rows[src, a:a + (n_b_total - a)]
        out[i] = torch.cat([rows.new_tensor([cls_id]), seg_a, rows.new_tensor([sep_id]), seg_b, rows.new_tensor([sep_id])])
        types[i, a + 2:] = 1
    return {"input_ids": out, "token_type_ids": types, "next_sentence_label": not_next.long()}


def bert_pretraining_loss(prediction_logits: torch.Tensor, labels: torch.Tensor,
                          seq_relationship_logits: torch.Tensor | None = None,
                          next_sentence_label: torch.Tensor | None = None) -> torch.Tensor:
    """CE over masked positions (labels != -100), plus CE of the (B, 2) NSP logits when given."""
    V = prediction_logits.shape[-1]
    loss = F.cross_entropy(prediction_logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=-100)
    if seq_relationship_logits is not None and next_sentence_label is not None:
        loss = loss + F.cross_entropy(seq_relationship_logits.float(), next_sentence_label.reshape(-1))
    return loss


def make_transform(*, mask_id: int, vocab_size: int, cls_id: int, sep_id: int, pad_id: int | None = None,
                   nsp: bool = True, prob: float = 0.15):
    """``transform(batch, generator)``: packed rows -> NSP pairs (if ``nsp``) -> masked inputs and labels."""
    specials = [i for i in (cls_id, sep_id, pad_id, mask_id) if i is not None]

    def transform(batch: dict, generator: torch.Generator) -> dict:
        if nsp:
            out = nsp_pairs(batch["input_ids"], cls_id=cls_id, sep_id=sep_id, generator=generator)
        else:
            out = {"input_ids": batch["input_ids"], "token_type_ids": torch.zeros_like(batch["input_ids"])}
        out["input_ids"], out["labels"] = mask_tokens(out["input_ids"], mask_id=mask_id, vocab_size=vocab_size,
                                                      generator=generator, prob=prob, special_ids=specials)
        return out

    return transform


def make_step_fn():
    """``step_fn(model, batch)`` for a BERT with its MLM (and NSP) heads; ``n_tokens`` = masked tokens."""

    def step_fn(model, batch):
        out = model(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                    attention_mask=batch.get("attention_mask"))
        nsp_label = batch.get("next_sentence_label")
        loss = bert_pretraining_loss(out.prediction_logits, batch["labels"],
                                     out.seq_relationship_logits if nsp_label is not None else None, nsp_label)
        metrics = {"n_tokens": int((batch["labels"] != -100).sum())}
        if nsp_label is not None and out.seq_relationship_logits is not None:
            metrics["nsp_acc"] = float((out.seq_relationship_logits.argmax(-1) == nsp_label).float().mean())
        return loss, metrics

    return step_fn
