"""T5 against transformers' T5ForConditionalGeneration: v1.0 (ReLU, tied, rescaled head) and v1.1
(GeGLU, untied or tied, no rescale), padded inputs, labels, the cached decoder, greedy / sampled /
beam generation, the save round trip, the published sizes, and the checkpoints that must fail."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.errors import CheckpointError, ConfigError  # noqa: E402
from lmzoo.interop.safetensors_io import write_directory  # noqa: E402
from lmzoo.models.t5.config import PRESETS, T5Config  # noqa: E402
from tests.parity import ATOL, max_diff  # noqa: E402

V = 64
BASE = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
CONFIGS = {
    "v1.0-tied": dict(num_decoder_layers=3),  # ReLU, head = shared embedding, scaled by d_model**-0.5
    "v1.1-tied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),  # transformers 5 ties it anyway
    "v1.1-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),  # own lm_head in the file
}


def _hf(name: str, spread: bool = False, **over):
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**BASE, **CONFIGS[name], **over})).eval()
    with torch.no_grad():
        if spread:  # default init makes a tiny T5 repeat one token; wider weights give varied generations
            for n, p in hf.named_parameters():
                if "layer_norm" not in n:
                    p.normal_(0, 0.5 if n in ("shared.weight", "lm_head.weight") else 0.3)
        if name == "v1.1-untied":
            hf.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32) * (0.5 if spread else 1.0))
    return hf


def _save(hf, path, name: str):
    hf.save_pretrained(path)
    if name == "v1.1-untied":
        cfg = json.loads((path / "config.json").read_text())
        assert not cfg["scale_decoder_outputs"]
        assert torch.equal(lmzoo.load(path).lm_head.weight, hf.lm_head.weight)  # the saved file has its own head
    return lmzoo.load(path)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0
    ids[mask == 0] = 0
    dec = torch.randint(2, V, (3, 9), generator=g)
    return ids, mask, dec


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_t5_logits_loss_and_cache(name, tmp_path):
    hf = _hf(name)
    ours = _save(hf, tmp_path / "hf", name)
    assert ours.config.tie_embeddings == (name != "v1.1-untied")
    assert ours.head_scale == (32 ** -0.5 if name == "v1.0-tied" else 1.0)
    ids, mask, dec = _inputs()
    dec_mask = torch.ones_like(dec)
    dec_mask[2, 6:] = 0  # a right-padded target
    labels = dec.masked_fill(dec_mask == 0, -100)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        b = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        d = max_diff(a.logits, b.logits)
        assert d <= ATOL, f"logits differ by {d}"
        assert max_diff(a.encoder_last_hidden_state, b.encoder_last_hidden_state) <= ATOL
        eager = lmzoo.load(tmp_path / "hf", attn_kernel="eager")  # the written-out kernel, bias and mask added
        assert max_diff(eager(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                              decoder_attention_mask=dec_mask).logits, b.logits) <= ATOL
        # the encoder's padding is real: without the mask, the padded rows change
        assert max_diff(ours(input_ids=ids, decoder_input_ids=dec).logits[1:], a.logits[1:]) > 1e-3
        # labels: the decoder reads them shifted right behind the start token; -100 is ignored
        la, lb = ours(input_ids=ids, attention_mask=mask, labels=labels), hf(input_ids=ids, attention_mask=mask,
                                                                                labels=labels)
        assert abs(la.loss.item() - lb.loss.item()) <= ATOL and max_diff(la.logits, lb.logits) <= ATOL
        # cached decode: the encoder runs once, then one decoder token at a time
        full = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        cache = ours.new_cache(3, dec.shape[1])
        steps = [ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :2], cache=cache).logits]
        assert cache.cross is not None and cache.cross[0][0].shape == (3, 4, 11, 8)
        for t in range(2, dec.shape[1]):
            steps.append(ours(decoder_input_ids=dec[:, t:t + 1], cache=cache).logits)  # no input_ids needed
        d = max_diff(torch.cat(steps, 1), full)
        assert d <= ATOL, f"cached decode differs from the full forward by {d}"


@pytest.mark.parametrize("name", ["v1.0-tied", "v1.1-untied"])
def test_t5_generation_matches_transformers(name, tmp_path):
    # transformers' generate sizes its cache by num_layers, so its decoder must be as deep as the encoder
    hf = _hf(name, spread=True, num_decoder_layers=2)
    ours = _save(hf, tmp_path / "hf", name)
    ids, mask, _ = _inputs(seed=3)
    kw = dict(max_new_tokens=10, pad_token_id=5)  # pad 5: transformers fills finished beams with EOS when pad is 0
    greedy = lmzoo.generate(ours, ids, mask, **kw, eos_token_id=1)
    assert torch.equal(greedy, hf.generate(ids, attention_mask=mask, do_sample=False, **kw, eos_token_id=1))
    assert greedy[:, 0].eq(0).all()  # the decoder starts from decoder_start_token_id
    # EOS on tokens the model does produce, so that beams finish at different lengths
    eos = [int(greedy[0, 3]), int(greedy[2, 2])]
    for nb, lp, early in ((3, 1.0, False), (4, 0.5, True), (2, 2.0, "never")):
        a = lmzoo.generate(ours, ids, mask, **kw, eos_token_id=eos, num_beams=nb, length_penalty=lp,
                           early_stopping=early, num_return_sequences=2)
        b = hf.generate(ids, attention_mask=mask, do_sample=False, **kw, eos_token_id=eos, num_beams=nb,
                        length_penalty=lp, early_stopping=early, num_return_sequences=2)
        assert torch.equal(a, b), f"beams={nb}\nlmzoo {a.tolist()}\nhf    {b.tolist()}"
    # seeded sampling (each row on the serving engine with its own generator, so not transformers' RNG
    # calls): reproducible, and every drawn token is inside the top-k/top-p set transformers' logits allow
    sample = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=eos)
    torch.manual_seed(11)
    a = lmzoo.generate(ours, ids, mask, **kw, **sample)
    torch.manual_seed(11)
    assert torch.equal(a, lmzoo.generate(ours, ids, mask, **kw, **sample))
    from lmzoo.generate.sampling import LogitsProcessor, process_logits

    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=a).logits  # (B, 1 + new, V)
    allowed = ~torch.isinf(process_logits(ref[:, :-1].reshape(-1, ref.shape[-1]), a[:, :1].repeat_interleave(
        a.shape[1] - 1, 0), LogitsProcessor(True, 0.7, 20, 0.9))).view(a.shape[0], a.shape[1] - 1, -1)
    drawn = allowed.gather(2, a[:, 1:, None])[..., 0]  # (B, new): was the token allowed where it was drawn
    live = torch.cat([torch.ones_like(a[:, :1]), ~torch.isin(a[:, 1:-1], torch.tensor(eos))], 1).cumprod(1).bool()
    assert drawn[live].all() and not torch.equal(a, greedy), (a, drawn)


def test_cross_kv_are_computed_once_per_input(tmp_path):
    ours = _save(_hf("v1.0-tied"), tmp_path / "hf", "v1.0-tied")
    calls = []
    ours.decoder_layers[0].cross_attn.k_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    ours.encoder.layers[0].attn.q_proj.register_forward_hook(lambda m, i, o: calls.append("encoder"))
    ids, mask, _ = _inputs()
    out = lmzoo.generate(ours, ids, mask, max_new_tokens=6)
    assert out.shape == (3, 7)
    assert calls == ["encoder", (3, 11, 32)]  # one encoder pass, one K projection of its (B, S, D) output


@pytest.mark.parametrize("name", ["v1.0-tied", "v1.1-untied"])
def test_t5_save_round_trip(name, tmp_path):
    hf = _hf(name)
    ours = _save(hf, tmp_path / "hf", name)
    lmzoo.save(ours, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["architectures"] == ["T5ForConditionalGeneration"] and saved["feed_forward_proj"] == ours.config.ffn
    hf2 = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    ids, mask, dec = _inputs()
    with torch.no_grad():
        d = max_diff(ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                     hf2(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
    assert d <= ATOL, f"round trip changed logits by {d}"
    ref = hf.state_dict()
    for k, t in hf2.state_dict().items():  # every tensor comes back bit for bit
        assert torch.equal(t, ref[k]), k
    again = lmzoo.load(tmp_path / "saved")
    assert again.config.tie_embeddings == ours.config.tie_embeddings
    for (k, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(again.state_dict().items())):
        assert torch.equal(a, b), k


def test_bad_t5_checkpoints_fail_loudly(tmp_path):
    hf = _hf("v1.1-untied")
    hf.save_pretrained(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}

    def write(name, st, c=cfg):
        write_directory(tmp_path / name, st, {"config.json": json.dumps(c)})
        return tmp_path / name

    missing = {k: v for k, v in state.items() if k != "decoder.block.1.layer.1.EncDecAttention.v.weight"}
    with pytest.raises(CheckpointError, match=r"missing key.*decoder\.block\.1\.layer\.1\.EncDecAttention\.v\.weight"):
        lmzoo.load(write("missing", missing))
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    with pytest.raises(CheckpointError, match=r"relative_attention_bias.*shape \(6, 4\).*expects \(8, 4\)"):
        lmzoo.load(write("buckets", {**state, bias: state[bias][:6]}))
    with pytest.raises(CheckpointError, match=r"unexpected key.*encoder\.block\.0\.layer\.2"):
        lmzoo.load(write("stray", {**state, "encoder.block.0.layer.2.layer_norm.weight": torch.ones(32)}))
    # a config that says untied needs the head in the file
    headless = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError, match=r"missing key.*lm_head\.weight"):
        lmzoo.load(write("headless", headless, {**cfg, "tie_word_embeddings": False}))
    with pytest.raises(ConfigError, match="feed_forward_proj 'gated-gelu-x'"):
        lmzoo.load(write("ffn", state, {**cfg, "feed_forward_proj": "gated-gelu-x"}))
    with pytest.raises(ConfigError, match="activation 'swiglu'"):
        T5Config.from_hf({**cfg, "feed_forward_proj": "swiglu"})


PUBLISHED = {"t5-small": 60_506_624, "t5-base": 222_903_552, "t5-large": 737_668_096,
             "t5-v1_1-small": 76_961_152, "t5-v1_1-base": 247_577_856}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    cfg = PRESETS[name]
    assert lmzoo.build(name, device="meta").num_parameters() == PUBLISHED[name]
    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_cfg))
    # transformers 5 always ties the head in a fresh model; v1.1's own head adds vocab · d_model
    untied = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    assert ref.num_parameters() + untied == PUBLISHED[name]


def test_published_t5_small_config_is_the_preset():
    published = {"architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 512,
                 "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
                 "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
                 "num_heads": 8, "num_layers": 6, "output_past": True, "pad_token_id": 0,
                 "relative_attention_num_buckets": 32, "vocab_size": 32128}
    cfg = T5Config.from_hf(published)
    assert cfg.replace(hf_extra={}) == PRESETS["t5-small"]
    assert T5Config.from_hf(cfg.to_hf()) == cfg


def test_zoo_row_and_cli_generate(tmp_path, capsys):
    from lmzoo.cli.main import main

    assert main(["zoo", "--family", "t5", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    small = rows["t5-small"]
    assert small["shape"] == "encoder-decoder" and small["position"].startswith("relative bias (32 buckets")
    assert small["norm"] == "RMSNorm (pre-norm)" and small["layers"] == "6+6"
    assert small["kv_bytes_per_token"] == 2 * 8 * 64 * 6 * 2  # decoder self-attention K and V, 6 layers, bf16
    assert rows["t5-v1_1-small"]["activation"] == "GeGLU (tanh)"
    hf = _hf("v1.1-untied", spread=True, num_decoder_layers=2)
    ours = _save(hf, tmp_path / "hf", "v1.1-untied")
    assert main(["generate", "--model", str(tmp_path / "hf"), "--ids", "5 6 7 8", "--max-new-tokens", "5"]) == 0
    got = [int(t) for t in capsys.readouterr().out.split()]
    assert got == lmzoo.generate(ours, torch.tensor([[5, 6, 7, 8]]), max_new_tokens=5)[0, 1:].tolist()
