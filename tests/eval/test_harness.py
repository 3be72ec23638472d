"""The lm-eval adapter against lm-eval's own HFLM on the same tiny LLaMA (per-request log-likelihoods of
the shipped multiple-choice and rolling tasks), generate_until's stop strings on a model forced to repeat
one known token, run_harness on the shipped tasks, the committed task data regenerating byte for byte,
and the errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmzoo.errors import ConfigError  # noqa: E402
from lmzoo.eval.harness import TASKS_DIR, LmzooLM, cut_at_stops, run_harness  # noqa: E402
from lmzoo.eval.harness_tasks import make_data  # noqa: E402

MAXLEN = 48  # shorter than most text lines: the rolling task scores several windows per document
SPECIALS = ["<s>", "</s>", "<unk>"]


def _tokenizer():
    """A character-level BPE over every character of the shipped task data, plus one merge: "ab" is id 0
    (the forced model below repeats it). "<s>" is prepended by the post-processor, as LLaMA's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, processors

    chars = sorted({c for name in make_data.FILES for c in (TASKS_DIR / name).read_text(encoding="utf-8")} - {"\n"})
    vocab = {"ab": 0, **{t: i + 1 for i, t in enumerate(SPECIALS)}}
    for c in chars + ["\n"]:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    tk.add_special_tokens(SPECIALS)
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="</s>")


def _llama(vocab: int, forced: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAXLEN,
                                   initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if forced:  # a zero final norm zeroes every logit: the argmax is always the first id, "ab"
        with torch.no_grad():
            model.model.norm.weight.zero_()
    return model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    tok = _tokenizer()
    out = {}
    for name in ("random", "forced"):
        d = tmp_path_factory.mktemp(name)
        _llama(len(tok), forced=name == "forced").save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def ours(model_dirs):
    return LmzooLM(path=str(model_dirs["random"]), batch_size=8, device="cpu")


def _samples(lm, task: str, limit: int) -> list:
    manager = TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False)
    out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager, bootstrap_iters=0,
                          log_samples=True, verbosity="ERROR")
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("task,limit", [("lmzoo_zh_numbers", 6), ("lmzoo_text", 4)])
def test_per_request_loglikelihoods_equal_hflm(model_dirs, ours, task, limit):
    from lm_eval.models.huggingface import HFLM

    hflm = HFLM(pretrained=str(model_dirs["random"]), device="cpu", dtype="float32", batch_size=8)
    mine, theirs = _samples(ours, task, limit), _samples(hflm, task, limit)
    flat = lambda rs: [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in rs]  # noqa: E731
    a = [x for doc in mine for x in flat(doc)]
    b = [x for doc in theirs for x in flat(doc)]
    assert len(a) == len(b) == limit * (4 if task == "lmzoo_zh_numbers" else 1)
    diff = max(abs(x - y) for x, y in zip(a, b))
    assert diff <= 1e-4, diff
    assert len({round(x, 2) for x in a}) > len(a) // 2  # real, varied scores, not one constant
    if task == "lmzoo_zh_numbers":  # the greedy flags agree too
        assert [r[0][1] for doc in mine for r in doc] == [r[0][1] for doc in theirs for r in doc]
    else:  # most of these lines are longer than 48 tokens: several windows each, summed
        assert sum(len(ours.tok_encode(r["text"])) > MAXLEN for r in make_data.text()[:limit]) >= 2


def _gen(lm, context: str, **gen_kwargs) -> str:
    req = Instance(request_type="generate_until", doc={}, arguments=(context, gen_kwargs), idx=0)
    return lm.generate_until([req], disable_tqdm=True)[0]


def test_generate_until_cuts_at_the_stop_string(model_dirs):
    lm = LmzooLM(path=str(model_dirs["forced"]), device="cpu")
    calls = []
    lm.model.register_forward_hook(lambda *a: calls.append(1))
    assert _gen(lm, "1 + 1 =", max_gen_toks=5, until=[]) == "ab" * 5  # the model's only word
    calls.clear()
    assert _gen(lm, "1 + 1 =", max_gen_toks=20, until=["ba"]) == "a"  # "abab" holds "ba": cut inside a token
    assert len(calls) == 2  # and decoding stopped as soon as the stop string was there, not after 20 tokens
    assert _gen(lm, "x", max_gen_toks=20, until=["zz", "bab"]) == "a"  # the earliest of several stops
    assert _gen(lm, "x", max_gen_toks=3, until="q") == "ababab"  # a stop never produced: max_gen_toks ends it
    assert cut_at_stops("12\n34", ["\n", "3"]) == "12"


def test_run_harness_on_the_shipped_tasks(model_dirs):
    out = run_harness(str(model_dirs["random"]), ["lmzoo_zh_numbers", "lmzoo_add", "lmzoo_text"], limit=3,
                      batch_size=4)
    res = out["results"]
    assert {"acc,none", "acc_norm,none"} <= set(res["lmzoo_zh_numbers"])
    assert 0.0 <= res["lmzoo_zh_numbers"]["acc,none"] <= 1.0
    assert res["lmzoo_add"]["exact_match,strip"] == 0.0  # a random model does not add
    text = res["lmzoo_text"]
    assert {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"} <= set(text)
    # bits_per_byte = log2(byte_perplexity), and a random model is far from perfect (1 bit/byte or worse)
    assert math.isclose(text["bits_per_byte,none"], math.log2(text["byte_perplexity,none"]), rel_tol=1e-6)
    assert text["bits_per_byte,none"] > 1.0


def test_adapter_model_arg_scores_the_adapted_model(model_dirs, ours, tmp_path):
    import lmzoo
    from lmzoo.eval.likelihood import loglikelihoods
    from lmzoo.peft.adapter_files import save_adapter
    from lmzoo.peft.apply import apply_lora
    from lmzoo.peft.lora import adapters

    model = apply_lora(lmzoo.load(model_dirs["random"]), r=2, alpha=4, dropout=0.0)
    with torch.no_grad():  # lora_B starts at zero (no change); give it weight so the adapter matters
        for m in adapters(model).values():
            m.lora.lora_B.normal_(0, 0.5)
    save_adapter(model, tmp_path)
    adapted = LmzooLM(path=str(model_dirs["random"]), adapter=str(tmp_path), device="cpu")
    reqs = [([1, 5, 6, 7], [8, 9]), ([1, 10], [11, 12, 13])]
    want = loglikelihoods(model.eval(), reqs)
    got = adapted._loglikelihood_tokens([(None, c, t) for c, t in reqs], disable_tqdm=True)
    base = ours._loglikelihood_tokens([(None, c, t) for c, t in reqs], disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, want)) <= 1e-5
    assert min(abs(a[0] - b[0]) for a, b in zip(got, base)) > 1e-3


def test_unknown_task_and_bad_model_args(model_dirs):
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['no_such_task'\]; known here: \['lmzoo_add'"):
        run_harness(str(model_dirs["random"]), ["no_such_task"])
    with pytest.raises(ConfigError, match="unknown model_args \\['pretrained_model'\\]"):
        LmzooLM(pretrained_model="x")
    with pytest.raises(ConfigError, match="give the model directory"):
        LmzooLM()


def test_lmzoo_is_a_registered_lm_eval_model():
    from lm_eval.api.registry import get_model

    assert get_model("lmzoo") is LmzooLM
    assert get_model("hf").__name__ == "HFLM"  # registering lmzoo first did not hide lm-eval's own models


def test_shipped_task_data_regenerates_byte_for_byte(tmp_path):
    make_data.write_all(tmp_path)
    for name in make_data.FILES:
        assert (tmp_path / name).read_bytes() == (TASKS_DIR / name).read_bytes(), name
    sizes = sum((TASKS_DIR / n).stat().st_size for n in make_data.FILES)
    assert sizes < 100_000
    rows = [json.loads(line) for line in (TASKS_DIR / "zh_numbers.jsonl").read_text(encoding="utf-8").splitlines()]
    from lmzoo.data.numerals import from_chinese

    for r in rows:  # the labelled choice is the numeral's value, and the four choices differ
        assert int(r["choices"][r["label"]]) == from_chinese(r["numeral"]) and len(set(r["choices"])) == 4


def test_without_lm_eval_the_error_says_what_to_install():
    import subprocess
    import sys

    code = ("import sys; sys.modules['lm_eval'] = None\n"  # import lm_eval now raises ImportError
            "from lmzoo.errors import ConfigError\n"
            "from lmzoo.eval.harness import run_harness\n"
            "try:\n    run_harness('x', ['lmzoo_add'])\nexcept ConfigError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "lmzoo eval --harness needs lm-eval: pip install 'lmzoo[eval]'", out.stderr
