"""Dropout where each family's reference applies it, in training forwards only.

With eager attention on both sides, lmzoo draws its dropout masks in the same order and shapes as
transformers (embeddings, then per layer: attention probabilities, attention output, MLP output), so
with one seed a train-mode forward equals transformers' train-mode forward. Eval mode is untouched
(the parity tests cover it); placement is also checked directly: p = 1 on the residual drops the
branch, leaving the stack a function of the embeddings alone."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.models.bloom.config import BloomConfig  # noqa: E402
from lmzoo.models.chatglm2.config import ChatGLM2Config  # noqa: E402
from lmzoo.models.deepseek_v2.config import DeepseekV2Config  # noqa: E402
from lmzoo.models.gpt2.config import GPT2Config  # noqa: E402
from lmzoo.models.llama.config import LlamaConfig  # noqa: E402
from lmzoo.nn.attention import Attention, AttnInputs  # noqa: E402
from lmzoo.nn.mlp import MLP  # noqa: E402
from lmzoo.nn.norms import LayerNorm  # noqa: E402
from lmzoo.nn.transformer import TransformerLayer  # noqa: E402

V = 61
HF = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, embd_pdrop=0.2, attn_pdrop=0.3,
        resid_pdrop=0.25)),
    "bloom": lambda: transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=V, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.25, attention_dropout=0.3)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_dropout=0.3)),
}


def _pair(name, tmp_path):
    torch.manual_seed(0)
    hf = HF[name]()
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(tmp_path / name)
    ours = lmzoo.load(tmp_path / name)
    for layer in ours.layers:
        layer.attn.set_kernel("eager")
    return hf, ours


@pytest.mark.parametrize("name", sorted(HF))
def test_train_mode_equals_transformers_with_one_seed(name, tmp_path):
    hf, ours = _pair(name, tmp_path)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    hf.train(), ours.train()
    with torch.no_grad():
        torch.manual_seed(7)
        a = ours(ids).logits
        torch.manual_seed(7)
        b = hf(ids).logits
        torch.manual_seed(8)
        c = ours(ids).logits
        ours.eval(), hf.eval()
        e, f = ours(ids).logits, hf(ids).logits
    assert (a - b).abs().max() <= 1e-4, (a - b).abs().max()
    assert (a - c).abs().max() > 1e-3  # another seed, other masks: dropout is on
    assert (e - f).abs().max() <= 1e-4 and (a - e).abs().max() > 1e-3  # eval: no dropout


@pytest.mark.parametrize("placement", ["pre", "post", "deepnorm"])
def test_p_one_on_the_residual_drops_every_branch(placement):
    # Residual dropout sits on f(·) before it joins the residual: with p = 1 the layer reduces to
    # its residual path alone (pre: x; post: norm(norm(x)); deepnorm: α·mlp_norm(α·attn_norm(x))).
    torch.manual_seed(0)
    D = 16
    alpha = 2.0 if placement == "deepnorm" else 1.0
    attn = Attention(D, 2)
    layer = TransformerLayer(attn, MLP(D, 32), LayerNorm(D), LayerNorm(D), placement=placement, alpha=alpha,
                             dropout=1.0).train()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        y = layer(x, AttnInputs(is_causal=True), 0)
        n1, n2 = layer.attn_norm, layer.mlp_norm
        want = {"pre": x, "post": n2(n1(x)), "deepnorm": alpha * n2(alpha * n1(x))}[placement]
        assert torch.allclose(y, want, atol=1e-6)
        assert not torch.allclose(layer.eval()(x, AttnInputs(is_causal=True), 0), want, atol=1e-3)


def test_dropout_fields_round_trip_through_the_hf_config():
    cases = [
        (GPT2Config(vocab_size=V, d_model=32, n_layers=1, n_heads=4, d_ff=64, embed_dropout=0.1, attn_dropout=0.2,
                    resid_dropout=0.3), {"embd_pdrop": 0.1, "attn_pdrop": 0.2, "resid_pdrop": 0.3}),
        (BloomConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, hidden_dropout=0.1, attention_dropout=0.2),
         {"hidden_dropout": 0.1, "attention_dropout": 0.2}),
        (LlamaConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, d_ff=48, attention_dropout=0.2),
         {"attention_dropout": 0.2}),
        (ChatGLM2Config(vocab_size=V, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48,
                        attention_dropout=0.2, hidden_dropout=0.1), {"attention_dropout": 0.2, "hidden_dropout": 0.1}),
        (DeepseekV2Config(vocab_size=V, d_model=32, n_layers=1, n_heads=4, d_ff=48, attention_dropout=0.2),
         {"attention_dropout": 0.2}),
    ]
    for cfg, keys in cases:
        hf = cfg.to_hf()
        assert {k: hf[k] for k in keys} == keys, type(cfg).__name__
        assert type(cfg).from_hf(hf) == cfg, type(cfg).__name__
    # a GPT-2 config.json without the fields means GPT2Config's 0.1 (as transformers reads it)
    bare = {k: v for k, v in cases[0][0].to_hf().items() if not k.endswith("pdrop")}
    g = GPT2Config.from_hf(bare)
    assert (g.embed_dropout, g.attn_dropout, g.resid_dropout) == (0.1, 0.1, 0.1)


def test_a_probability_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\]"):
        TransformerLayer(Attention(8, 2), MLP(8, 16), LayerNorm(8), LayerNorm(8), dropout=1.5)


ENCODERS = {
    "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)),
        lambda o: o.prediction_logits if hasattr(o, "prediction_logits") else o.logits),
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.2)),
        lambda o: o.logits),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
        patch_size=8, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)), lambda o: o.last_hidden_state),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_families_train_mode_equals_transformers(name, tmp_path):
    make, read = ENCODERS[name]
    torch.manual_seed(0)
    hf = make()
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(tmp_path / name)
    ours = lmzoo.load(tmp_path / name)
    for m in ours.modules():
        if isinstance(m, Attention):
            m.set_kernel("eager")
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        kw = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    else:
        kw = {"input_ids": torch.randint(0, V, (2, 7), generator=g)}
        if name == "t5":
            kw["decoder_input_ids"] = torch.randint(0, V, (2, 5), generator=g)
    hf.train(), ours.train()
    with torch.no_grad():
        torch.manual_seed(7)
        a = read(ours(**kw))
        torch.manual_seed(7)
        b = read(hf(**kw))
        torch.manual_seed(8)
        c = read(ours(**kw))
    assert (a - b).abs().max() <= 1e-4, (a - b).abs().max()
    assert (a - c).abs().max() > 1e-3


def test_encoder_dropout_fields_round_trip(tmp_path):
    # Each family's config.json spelling, written by transformers, read by lmzoo, written back.
    from lmzoo.models.bert.config import BertConfig
    from lmzoo.models.clip.config import CLIPConfig
    from lmzoo.models.t5.config import T5Config
    from lmzoo.models.vit.config import ViTConfig

    hf = {
        BertConfig: (transformers.BertConfig(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3),
                     {"hidden_dropout": 0.2, "attention_dropout": 0.3}),
        T5Config: (transformers.T5Config(dropout_rate=0.25), {"dropout": 0.25}),
        ViTConfig: (transformers.ViTConfig(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3),
                    {"hidden_dropout": 0.2, "attention_dropout": 0.3}),
    }
    for cls, (ref, want) in hf.items():
        cfg = cls.from_hf(ref.to_dict())
        assert {k: getattr(cfg, k) for k in want} == want, cls.__name__
        assert cls.from_hf(cfg.to_hf()) == cfg, cls.__name__
    clip = CLIPConfig.from_hf(transformers.CLIPConfig(text_config={"attention_dropout": 0.1},
                                                      vision_config={"attention_dropout": 0.2}).to_dict())
    assert (clip.text.attention_dropout, clip.vision.attention_dropout) == (0.1, 0.2)
    again = CLIPConfig.from_hf(clip.to_hf())
    assert (again.text.attention_dropout, again.vision.attention_dropout) == (0.1, 0.2)
