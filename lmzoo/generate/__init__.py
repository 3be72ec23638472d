"""Generation: token ids in, token ids out. Knows nothing about tokenizers."""

from lmzoo.generate.engine import generate, stream
from lmzoo.generate.sampling import LogitsProcessor, process_logits

__all__ = ["generate", "stream", "LogitsProcessor", "process_logits"]
