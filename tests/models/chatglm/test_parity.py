"""ChatGLM-6B: no transformers class exists, so parity is with a reference written here from the
equations of THUDM's modeling_chatglm.py (read for the facts), run on the original checkpoint
layout directly (fused per-head query_key_value, dense_h_to_4h...), never through lmzoo's converter.
Then the properties of a prefix decoder: the prompt is bidirectional, generated tokens are causal,
the cached decode equals the full forward, and the load/save round trip is bit-exact."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lmzoo
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.models.chatglm2.config import claims as chatglm2_claims
from lmzoo.models.chatglm.config import ChatGLMConfig, claims
from lmzoo.models.chatglm.model import glm_position_ids, prompt_layout

MASK, GMASK, SOP, EOP, PAD = 30, 31, 34, 35, 3
HP = dict(vocab_size=40, hidden_size=32, num_layers=2, num_attention_heads=4, inner_hidden_size=48,
          layernorm_epsilon=1e-5, max_sequence_length=64, bos_token_id=SOP, eos_token_id=EOP, pad_token_id=PAD,
          mask_token_id=MASK, gmask_token_id=GMASK)


def original_config(**over) -> dict:
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "position_encoding_2d": True,
            "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}, "pre_seq_len": None,
            "prefix_projection": False, "quantization_bit": 0, "torch_dtype": "float32", "use_cache": True,
            **HP, **over}


def original_state(hp: dict, geglu: bool = False, seed: int = 0) -> dict:
    """Random tensors under the release's key names (ChatGLMForConditionalGeneration)."""
    g = torch.Generator().manual_seed(seed)
    D, V, ff = hp["hidden_size"], hp["vocab_size"], hp["inner_hidden_size"]
    hd = D // hp["num_attention_heads"]

    def r(*shape, std=0.3, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {"transformer.word_embeddings.weight": r(V, D, std=1.0), "lm_head.weight": r(V, D, std=0.2),
          "transformer.final_layernorm.weight": r(D, std=0.1, mean=1.0),
          "transformer.final_layernorm.bias": r(D, std=0.1)}
    for i in range(hp["num_layers"]):
        p = f"transformer.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = r(D, std=0.1, mean=1.0), r(D, std=0.1)
        sd[p + "attention.query_key_value.weight"] = r(3 * D, D)
        sd[p + "attention.query_key_value.bias"] = r(3 * D, std=0.1)
        sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"] = r(D, D, std=0.2), r(D, std=0.1)
        up = 2 * ff if geglu else ff
        sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"] = r(up, D, std=0.2), r(up, std=0.1)
        sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"] = r(D, ff, std=0.2), r(D, std=0.1)
        # A buffer the release stores (float16) and its own loader ignores; so must lmzoo's.
        sd[p + "attention.rotary_emb.inv_freq"] = torch.rand(hd // 4).half()
    return sd


# -- the reference: ChatGLM-6B's forward as THUDM's modeling_chatglm.py computes it ----------------
# Read from the release code itself (ChatGLMModel, GLMBlock, SelfAttention, attention_fn, get_masks,
# get_position_ids), in its float32 CPU recipe (``model.float()``, which turns the float16 inv_freq
# buffer into float32 after rounding it). Two things a reading from memory gets wrong:
# - ``ChatGLMModel.get_layer`` builds each GLMBlock without passing num_layers, so every block keeps
#   the default ``num_layers=28`` and the DeepNorm α is (2·28)^0.5 = √56 at ANY depth;
# - attention_fn divides q by sqrt(hd)·(layer_id + 1), fills masked scores with -10000 and then
#   multiplies the float scores by (layer_id + 1) before the softmax (Megatron's query-key layer
#   scaling): masked scores end at -10000·(layer_id + 1).
# The release initialises nothing (``_init_weights`` returns, the Linears are ``skip_init``), so there
# is no DeepNorm β to follow there; lmzoo's init is tested on its own below.
RELEASE_BLOCK_NUM_LAYERS = 28  # GLMBlock.__init__(..., num_layers=28, ...), never overridden


def reference_logits(sd: dict, hp: dict, ids: torch.Tensor, geglu: bool = False) -> torch.Tensor:
    B, T = ids.shape
    D, H, L = hp["hidden_size"], hp["num_attention_heads"], hp["num_layers"]
    hd, eps = D // H, hp["layernorm_epsilon"]
    alpha = (2 * RELEASE_BLOCK_NUM_LAYERS) ** 0.5  # GLMBlock.forward: alpha = (2 * self.num_layers) ** 0.5
    # get_position_ids / get_masks: context = tokens before <sop>; [gMASK] (else [MASK]) gives the
    # position of <sop> and every token after it; block positions count 1, 2, .. from <sop>.
    pos, block = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    masked = torch.zeros(B, T, T, dtype=torch.bool)  # True = masked, as the release's attention_mask
    for b, row in enumerate(ids.tolist()):
        ctx = row.index(SOP)
        mpos = row.index(GMASK) if GMASK in row else row.index(MASK)
        for t in range(T):
            pos[b, t], block[b, t] = (t, 0) if t < ctx else (mpos, t - ctx + 1)
            for j in range(T):
                masked[b, t, j] = not (j < ctx or j <= t)  # tril_() then [:, :, :context_length] = 1
    n = hd // 2  # RotaryEmbedding(hidden_size // (num_attention_heads * 2)): each half of the head
    inv = (1.0 / 10000 ** (torch.arange(0, n, 2).float() / n)).half().float()

    def rope(x, p):  # apply_rotary_pos_emb_index: x (B, T, H, n), p (B, T); rotate_half pairs (i, i + n/2)
        f = p[..., None].float() * inv  # (B, T, n/2)
        cos, sin = torch.cat((f, f), -1).cos()[:, :, None], torch.cat((f, f), -1).sin()[:, :, None]
        return x * cos + torch.cat((-x[..., n // 2:], x[..., :n // 2]), -1) * sin

    def ln(x, name):
        return F.layer_norm(x, (D,), sd[name + ".weight"], sd[name + ".bias"], eps)

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    h = sd["transformer.word_embeddings.weight"][ids]
    for i in range(L):
        p = f"transformer.layers.{i}."
        y = ln(h, p + "input_layernorm")
        q, k, v = lin(y, p + "attention.query_key_value").view(B, T, H, 3 * hd).split(hd, dim=-1)
        q = torch.cat((rope(q[..., :n], pos), rope(q[..., n:], block)), -1)
        k = torch.cat((rope(k[..., :n], pos), rope(k[..., n:], block)), -1)
        coeff = float(i + 1)  # query_key_layer_scaling_coeff = layer_id + 1
        s = torch.einsum("bthd,bshd->bhts", q / (hd ** 0.5 * coeff), k)
        s = s.masked_fill(masked[:, None], -10000.0) * coeff
        a = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).reshape(B, T, D)
        h = alpha * y + lin(a, p + "attention.dense")  # attention_input * alpha + attention_output
        y = ln(h, p + "post_attention_layernorm")
        u = lin(y, p + "mlp.dense_h_to_4h")
        if geglu:  # lmzoo's GLM-130B variant (the release's GEGLU module): x1 * gelu(x2)
            x1, x2 = u.chunk(2, dim=-1)
            u = x1 * F.gelu(x2)
        else:  # gelu_impl
            u = 0.5 * u * (1.0 + torch.tanh(0.7978845608028654 * u * (1.0 + 0.044715 * u * u)))
        h = alpha * y + lin(u, p + "mlp.dense_4h_to_h")  # mlp_input * alpha + mlp_output
    return ln(h, "transformer.final_layernorm") @ sd["lm_head.weight"].T


def write_original(path, sd, cfg) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))


def prompt(*body) -> list[int]:
    return [*body, GMASK, SOP]


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    path = tmp_path_factory.mktemp("chatglm") / "orig"
    sd = original_state(HP)
    write_original(path, sd, original_config())
    return lmzoo.load(path), sd, path


# -- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_logits_equal_the_reference(glm, kernel):
    model, sd, _ = glm
    for layer in model.layers:
        layer.attn.set_kernel(kernel)
    ids = torch.tensor([prompt(5, 6, 7, 8, 9) + [10, 11, 12], prompt(12, 13, 14, 15, 16) + [17, 18, 19]])
    ids_mask = torch.tensor([prompt(5, 6) + [7, 8, 9, 10, 11, 12, 13]])
    ids_mask[0, 2] = MASK  # [MASK] (blank infilling) instead of [gMASK]
    with torch.no_grad():
        for x in (ids, ids_mask):
            d = (model(x).logits - reference_logits(sd, HP, x)).abs().max().item()
            assert d <= 1e-4, f"{kernel}: logits differ from the reference by {d}"
    for layer in model.layers:
        layer.attn.set_kernel("sdpa")


def test_geglu_variant_equals_the_reference(tmp_path):
    hp_cfg = original_config(glu_activation="geglu")
    sd = original_state(HP, geglu=True, seed=1)
    write_original(tmp_path / "orig", sd, hp_cfg)
    model = lmzoo.load(tmp_path / "orig")
    assert model.config.mlp == "geglu" and type(model.layers[0].mlp).__name__ == "GatedMLP"
    ids = torch.tensor([prompt(4, 5, 6, 7) + [8, 9]])
    with torch.no_grad():
        d = (model(ids).logits - reference_logits(sd, HP, ids, geglu=True)).abs().max().item()
    assert d <= 1e-4, d
    out = lmzoo.save(model, tmp_path / "saved")
    again = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["glu_activation"] == "geglu"
    assert all(torch.equal(again[k], v) for k, v in sd.items() if "inv_freq" not in k)


def test_save_writes_the_original_layout_back_bit_exact(glm, tmp_path):
    model, sd, src = glm
    out = lmzoo.save(model, tmp_path / "saved")
    saved = load_file(str(out / "model.safetensors"))
    want = {k: v for k, v in sd.items() if "inv_freq" not in k}  # a recomputed buffer, not a weight
    assert set(saved) == set(want)
    for k, v in want.items():
        assert torch.equal(saved[k], v), k
    cfg = json.loads((out / "config.json").read_text())
    for k, v in original_config().items():
        if k not in ("torch_dtype", "use_cache"):
            assert cfg[k] == v, k
    assert claims(cfg) and not chatglm2_claims(cfg)
    again = lmzoo.load(out)
    ids = torch.tensor([prompt(1, 2, 3) + [4]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


# -- the prefix decoder's properties ------------------------------------------------------------


def _states(model, ids):
    with torch.no_grad():
        return model(ids).hidden_states[0]  # (T, D)


def test_a_late_prompt_token_changes_earlier_prompt_states(glm):
    model, _, _ = glm
    ids = torch.tensor([prompt(5, 6, 7, 8, 9) + [10, 11]])
    changed = ids.clone()
    changed[0, 4] = 20  # the last prompt token before [gMASK]
    a, b = _states(model, ids), _states(model, changed)
    per_pos = (a - b).abs().amax(-1)
    assert (per_pos[:4] > 1e-3).all(), per_pos  # every earlier prompt position sees it: bidirectional prefix


def test_a_generated_token_never_changes_earlier_states(glm):
    model, _, _ = glm
    ids = torch.tensor([prompt(5, 6, 7, 8, 9) + [10, 11, 12]])
    for t in (7, 8, 9):  # <sop> is at 6; 7.. are generated tokens
        changed = ids.clone()
        changed[0, t] = 25
        a, b = _states(model, ids), _states(model, changed)
        assert torch.equal(a[:t], b[:t]), f"changing generated token {t} changed an earlier state"
        assert (a[t] - b[t]).abs().max() > 1e-3


def test_positions_follow_the_gmask_sop_convention():
    cfg = ChatGLMConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, d_ff=48, bos_token_id=SOP, mask_token_id=MASK,
                        gmask_token_id=GMASK)
    ids = torch.tensor([[PAD, PAD, 5, 6, 7, GMASK, SOP, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]])
    layout = prompt_layout(ids, mask, cfg)
    assert [t.tolist() for t in layout] == [[2], [4], [3]]  # 2 pads; 4 tokens before <sop>; [gMASK] at 3
    pos = glm_position_ids(layout, 0, 9)[0]
    assert pos[0].tolist() == [0, 0, 0, 1, 2, 3, 3, 3, 3]  # generated tokens keep [gMASK]'s position
    assert pos[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 3]  # block positions count 1, 2, 3 from <sop>
    assert glm_position_ids(layout, 8, 1)[0].tolist() == [[3], [3]]  # a decode step at index 8


def test_rope_frequencies_are_the_originals_float16_values():
    # Tiny heads hide the rounding in the logits (~1e-5), so check the table itself: head_dim 128
    # (the release's) -> RoPE of width 64 per half, frequencies stored as float16 by the original.
    model = lmzoo.build(ChatGLMConfig(vocab_size=40, d_model=128, n_layers=1, n_heads=1, d_ff=8, bos_token_id=SOP))
    exact = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    assert torch.equal(model.positions.rope.inv_freq, exact.half().float())
    assert not torch.equal(model.positions.rope.inv_freq, exact)


def test_cached_decode_equals_the_full_forward(glm):
    model, _, _ = glm
    ids = torch.tensor([prompt(5, 6, 7, 8) + [10, 11, 12, 13], prompt(9, 8, 7, 6) + [1, 2, 3, 4]])
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, ids.shape[1])
        steps = [model(ids[:, :6], cache=cache).logits]  # the prompt through <sop>
        for t in range(6, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], cache=cache).logits)
    d = (torch.cat(steps, 1) - full).abs().max().item()
    assert d <= 1e-5, d


def test_generate_with_cache_and_left_padding_equals_a_naive_loop(glm):
    model, _, _ = glm
    rows = [prompt(5, 6, 7, 8, 9), prompt(12, 13)]
    T = max(map(len, rows))
    ids = torch.tensor([[PAD] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    got = lmzoo.generate(model, ids, mask, max_new_tokens=6, pad_token_id=PAD)
    for b, r in enumerate(rows):
        seq = torch.tensor([r])
        for _ in range(6):  # greedy, no cache, full forward every step
            with torch.no_grad():
                nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert got[b, T - len(r):].tolist() == seq[0].tolist()
    with torch.no_grad():  # the padded row's logits equal the same row alone
        padded = model(ids, attention_mask=mask).logits[1, T - len(rows[1]):]
        alone = model(torch.tensor([rows[1]])).logits[0]
    assert (padded - alone).abs().max() <= 1e-5


def test_a_prompt_without_gmask_and_sop_is_refused(glm):
    model, _, _ = glm
    with pytest.raises(LmzooError, match=r"\[gMASK\].*<sop>"):
        model(torch.tensor([[5, 6, 7]]))


# -- config, init, sizes ------------------------------------------------------------------------


def test_config_claims_and_refusals():
    assert claims(original_config()) and not chatglm2_claims(original_config())
    v2 = {k: v for k, v in original_config().items() if k != "position_encoding_2d"}
    assert chatglm2_claims(v2) and not claims(v2)
    for bad, match in [(dict(position_encoding_2d=False), "position_encoding_2d"), (dict(pre_seq_len=8), "pre_seq_len"),
                       (dict(quantization_bit=4), "quantization_bit"),
                       (dict(glu_activation="swiglu"), "glu_activation")]:
        with pytest.raises(ConfigError, match=match):
            ChatGLMConfig.from_hf(original_config(**bad))


@pytest.mark.parametrize("deepnorm_layers, N", [(None, 8), (28, 28)])
def test_deepnorm_init_scale(deepnorm_layers, N):
    # DeepNorm's α and init gain β come from the same N (Wang et al. 2022, GLM-130B section 2.1): lmzoo's
    # own configs use N = n_layers; a config with deepnorm_layers set (the release layout's 28) uses it for
    # both. The release code has no init of its own to compare with (its Linears are skip_init).
    cfg = ChatGLMConfig(vocab_size=40, d_model=64, n_layers=8, n_heads=4, d_ff=256, bos_token_id=SOP,
                        deepnorm_layers=deepnorm_layers)
    model = lmzoo.build(cfg)
    beta = (2 * N) ** -0.5
    layer = model.layers[0]
    assert layer.placement == "deepnorm" and layer.alpha == pytest.approx((2 * N) ** 0.5)
    xavier = lambda lin: (2 / sum(lin.weight.shape)) ** 0.5  # noqa: E731
    for lin, gain in [(layer.attn.v_proj, beta), (layer.attn.o_proj, beta), (layer.mlp.up_proj, beta),
                      (layer.attn.q_proj, 1.0)]:
        assert lin.weight.std().item() == pytest.approx(gain * xavier(lin), rel=0.1), lin


def test_the_release_layout_keeps_alpha_of_28_layers(glm, tmp_path):
    # A 2-layer checkpoint in the release layout: α = √56 (the release's GLMBlock default), not √4.
    model, _, _ = glm
    assert model.config.deepnorm_layers == 28 and model.layers[0].alpha == pytest.approx(56 ** 0.5)
    hf = model.config.to_hf()
    assert hf["deepnorm_layers"] == 28 and ChatGLMConfig.from_hf(hf).deepnorm_layers == 28
    own = ChatGLMConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=48, bos_token_id=SOP)
    assert own.alpha_layers == 2 and lmzoo.build(own).layers[0].alpha == pytest.approx(2.0)
    assert own.to_hf()["deepnorm_layers"] == 2 and ChatGLMConfig.from_hf(own.to_hf()).alpha_layers == 2
    with pytest.raises(ConfigError, match="deepnorm_layers"):
        ChatGLMConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=48, bos_token_id=SOP, deepnorm_layers=0)


def test_packed_documents_are_refused_like_the_stack_refuses(glm):
    model, _, _ = glm
    ids = torch.tensor([prompt(5, 6) + [7, 8]])
    with pytest.raises(ValueError, match=r"chatglm: doc_ids .*not supported"):
        model(ids, doc_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="takes no cache"):  # the stack's own check comes first
        model(ids, doc_ids=torch.zeros_like(ids), cache=model.new_cache(1, 8))


def test_the_forward_is_the_stacks(glm):
    # ChatGLM-6B keeps no forward of its own: what DecoderLM.forward does (context check, labels, aux
    # loss, logits_to_keep) it does too.
    from lmzoo.nn.transformer import DecoderLM

    model, _, _ = glm
    assert type(model).forward is DecoderLM.forward
    ids = torch.tensor([prompt(5, 6, 7) + [8, 9]])
    with torch.no_grad():
        out, last = model(ids, labels=ids), model(ids, logits_to_keep=1)
    assert out.loss is not None and torch.allclose(last.logits[:, -1], out.logits[:, -1], atol=1e-6)


def test_preset_size_matches_the_release():
    model = lmzoo.build("chatglm-6b", device="meta")
    D, V, ff, L = 4096, 130528, 16384, 28
    per_layer = (3 * D * D + 3 * D) + (D * D + D) + (D * ff + ff) + (ff * D + D) + 4 * D
    assert model.num_parameters() == 2 * V * D + L * per_layer + 2 * D  # 6,707,929,088
    assert model.layers[0].alpha == pytest.approx(56 ** 0.5)
