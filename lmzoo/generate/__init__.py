"""Generation: token ids in, token ids out. Knows nothing about tokenizers.

Decoder-only and encoder-decoder models share one entry point (``generate``/``stream``); greedy and
sampled decoding step through the cache, ``num_beams > 1`` runs beam search.
"""

from lmzoo.generate.beam import beam_search
from lmzoo.generate.engine import generate, stream
from lmzoo.generate.sampling import LogitsProcessor, process_logits
from lmzoo.generate.seq2seq import stream_seq2seq

__all__ = ["generate", "stream", "beam_search", "stream_seq2seq", "LogitsProcessor", "process_logits"]
