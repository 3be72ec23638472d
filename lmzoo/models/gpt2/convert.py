"""GPT-2 checkpoint keys: transformers' ``GPT2LMHeadModel`` <-> lmzoo.

GPT-2's projections are ``Conv1D`` modules that store weights as (in, out), the transpose of
nn.Linear, and its attention input projection ``c_attn`` holds q, k and v fused along the output
dimension. Loading also accepts the bare ``GPT2Model`` / original OpenAI layout, whose keys lack
the ``transformer.`` prefix, and old checkpoints that saved the causal-mask buffers
``attn.bias`` / ``attn.masked_bias``. Saving always writes the ``GPT2LMHeadModel`` layout.
"""

from __future__ import annotations

import torch

from lmzoo.interop.convert import KeyMap, Rule, rename, split_rows, transposed
from lmzoo.models.gpt2.config import GPT2Config


def _fused_qkv(hf: str, ours: list[str], d: int) -> Rule:
    """c_attn.weight (d, 3d) as Conv1D -> q/k/v_proj.weight, each (d, d) as nn.Linear."""

    def to_ours(ts):
        w = ts[0].t()  # (3d, d): rows are q | k | v
        return [p.contiguous() for p in torch.split(w, d, dim=0)]

    def to_hf(ts):
        return [torch.cat(ts, dim=0).t().contiguous()]  # (3d, d) -> (d, 3d)

    return Rule([hf], ours, to_ours, to_hf)


def keymap(cfg: GPT2Config, hf: dict | None = None) -> KeyMap:
    d = cfg.d_model
    H, L = "transformer.h.{i}.", "layers.{i}."
    qkv = [L + f"attn.{p}_proj" for p in ("q", "k", "v")]
    rules = [
        rename("transformer.wte.weight", "embed.weight"),
        rename("transformer.wpe.weight", "positions.weight"),
        _fused_qkv(H + "attn.c_attn.weight", [k + ".weight" for k in qkv], d),
        split_rows(H + "attn.c_attn.bias", [k + ".bias" for k in qkv], [d, d, d]),
        transposed(H + "attn.c_proj.weight", L + "attn.o_proj.weight"),
        rename(H + "attn.c_proj.bias", L + "attn.o_proj.bias"),
        transposed(H + "mlp.c_fc.weight", L + "mlp.up_proj.weight"),
        rename(H + "mlp.c_fc.bias", L + "mlp.up_proj.bias"),
        transposed(H + "mlp.c_proj.weight", L + "mlp.down_proj.weight"),
        rename(H + "mlp.c_proj.bias", L + "mlp.down_proj.bias"),
    ]
    for hf_norm, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        rules += [rename(H + f"{hf_norm}.{p}", L + f"{ours}.{p}") for p in ("weight", "bias")]
    rules += [rename(f"transformer.ln_f.{p}", f"final_norm.{p}") for p in ("weight", "bias")]
    if not cfg.tie_embeddings:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    # attn.bias (the causal tril) and attn.masked_bias (-1e4) are buffers old transformers saved;
    # the mask is rebuilt here. A tied head may still have been saved as a copy of wte.
    ignore = [r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"]
    if cfg.tie_embeddings:
        ignore.append(r"lm_head\.weight")
    return KeyMap(rules, cfg.n_layers, ignore=ignore, optional_prefix="transformer.")
