"""Generation: token ids in, token ids out. Knows nothing about tokenizers.

Decoder-only and encoder-decoder models share one entry point (``generate``/``stream``); greedy and
sampled decoding step through the cache, ``num_beams > 1`` runs beam search; ``speculative`` drafts and
verifies k tokens per forward; ``continuous`` is the serving engine (continuous batching, paged cache).
"""

from lmzoo.generate.beam import beam_search
from lmzoo.generate.engine import generate, stream
from lmzoo.generate.sampling import LogitsProcessor, process_logits
from lmzoo.generate.seq2seq import stream_seq2seq
from lmzoo.generate.speculative import SpecStats, speculative_generate

__all__ = ["generate", "stream", "beam_search", "stream_seq2seq", "LogitsProcessor", "process_logits",
           "speculative_generate", "SpecStats"]
