"""What the GGUF test modules share (tests/interop/test_gguf.py, tests/models/*/test_gguf.py): the texts,
one torch thread per module, the rounded-weights reference and llama.cpp's CPU GELU."""

import copy

import numpy as np
import pytest
import torch

from lmzoo.nn.mlp import ACTIVATIONS

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a small test of tokenizers.",
         "我们今天去公园散步，天气很好。", "机器学习是人工智能的一个分支。"] * 20
EN, ZH = "The lazy fox, quick as a dog, said hello to 12345 worlds!", "今天天气很好，我们去学习人工智能吧。"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second thread only waits (and the suite runs two workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rounded(model, type, keep=()):
    """A copy of ``model`` whose matrices (all but the names in ``keep``) went through ``type``'s
    quantization and back with ``gguf.quants``, in lmzoo's layout: blocks of 32 run along a row, and the
    exporters' permutations and fusions only move rows, so the same numbers round. A matrix whose rows do
    not split into blocks goes through F16, as the exporter falls back."""
    import gguf

    qtype, f16 = getattr(gguf.GGMLQuantizationType, type.upper()), gguf.GGMLQuantizationType.F16
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.ndim == 2 and name not in keep:
                a = p.numpy().astype(np.float32)
                try:
                    back = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
                except gguf.QuantError:
                    back = gguf.quants.dequantize(gguf.quants.quantize(a, f16), f16)
                p.copy_(torch.from_numpy(back.reshape(p.shape).copy()))
    return out


def llamacpp_gelu(name: str):
    """llama.cpp's CPU GELU (GGML_GELU_FP16): a table of F16 values at the F16-rounded input, exact past
    |x| >= 10; ``name`` is lmzoo's activation of the same function."""
    gelu = ACTIVATIONS[name]

    def act(x):
        y = gelu(x.half().float()).half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    return act
