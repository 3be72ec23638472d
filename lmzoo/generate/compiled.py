"""``torch.compile`` of the decode step (``compile_for_decode``): one compiled forward per model, run by the
static-cache loop of ``engine.stream``.

Why: at batch 1 a decode step is ~150 small ops per token (norms, RoPE, residual adds, casts, views) around
the GEMVs; eagerly each one is a Python call, a dispatch and a pass over memory. Inductor's CPU backend fuses
the element-wise ops into generated C++ loops and runs the whole forward as one graph (the GEMVs stay ATen
calls). Measured on a 2-core AMD EPYC (AVX2), 30.9M LLaMA, fp32: 124 tok/s eager with the same static cache,
160 compiled (docs/performance.md has the side-by-side table).

How: the model's forward is compiled as it is (no graph breaks in the causal decoders: the cache's
in-place writes and its Python length are traced; the length becomes a symbolic int after the first
change, so the steps after the second reuse one graph); the prefill is a second graph. ``generate`` on a
compiled model therefore leaves the paged engine for the preallocated ``KVCache`` loop (the serving engine
keeps its eager paged path: its block tables change shape as requests come and go).

Cost: the first call compiles (25-45 s for 8 layers on 2 cores; inductor caches the generated code in its
on-disk cache, so a later process compiles faster). It needs a C++ compiler at run time; without one
``compile_for_decode`` says so in one line and the model decodes eagerly. Outputs equal the eager model's to
float rounding (tests/generate/test_compiled.py: logits and greedy ids, for every causal family).
"""

from __future__ import annotations

import shutil
import sys

from torch import nn

# The decoder layers share one forward whose layer index is a constant per call, so dynamo keeps one entry
# per layer (and per prefill/decode shape); its default limit of 8 would send the 9th layer back to eager.
RECOMPILE_LIMIT = 256


def cache_bucket(n: int, limit: int | None) -> int:
    """The static cache length for ``n`` tokens on a compiled model: the next power of two from 256, at most
    the context ``limit``. The cache's length is part of the compiled graph's guards; rounding it keeps calls
    with other prompt or output lengths on the graphs already compiled (one more, made dynamic, at most)."""
    size = 256
    while size < n:
        size *= 2
    return max(n, min(size, limit)) if limit else size


def mark_dynamic(ids, mask, cache) -> None:
    """Compile the prefill and the cache for any length from the start (else each new prompt length or cache
    size recompiles once before dynamo generalises, ~15 s each): the prompt's length and the cache buffers'
    ``max_len`` are marked dynamic (``maybe_``: a model whose code needs a concrete length keeps it)."""
    from torch._dynamo import maybe_mark_dynamic

    for t in (ids, mask):
        if t is not None and t.shape[1] > 1:
            maybe_mark_dynamic(t, 1)
    for t in list(getattr(cache, "k", [])) + list(getattr(cache, "v", [])):
        maybe_mark_dynamic(t, 2)


def compiler_available() -> tuple[bool, str]:
    """(True, compiler path) when inductor's CPU backend can build its C++ kernels; else (False, why)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return True, get_cpp_compiler()
    except ImportError:  # an older torch: look for the compilers inductor looks for
        found = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        return (True, found) if found else (False, "no C++ compiler (g++, c++ or clang++) on PATH")
    except Exception as e:  # inductor's own "no valid compiler" errors
        return False, f"no C++ compiler inductor can use ({str(e).strip().splitlines()[0]})"


def compile_for_decode(model: nn.Module, say=lambda msg: print(msg, file=sys.stderr)) -> bool:
    """Give ``model`` a compiled forward (``model.decode_step``) that ``lmzoo.generate`` decodes with.
    False, with one message through ``say``, when no C++ compiler is present: the model stays eager."""
    import torch
    import torch._dynamo

    if getattr(model, "decode_step", None) is not None:
        return True
    ok, why = compiler_available()
    if not ok:
        say(f"torch.compile unavailable: {why}; decoding eagerly")
        return False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    # a plain attribute, not a submodule: the compiled wrapper must not enter modules() or the state dict
    model.__dict__["decode_step"] = torch.compile(model.forward, dynamic=None)
    return True
