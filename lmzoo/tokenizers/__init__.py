"""Tokenizers: load every common format, train the four classic kinds, chat templates, comparisons.

``load_tokenizer`` and ``train_tokenizer`` both return one ``Tokenizer`` type (tokenizer.py)
over an engine: Hugging Face ``tokenizers`` by default, sentencepiece for ``.model`` files and
tiktoken for ``.tiktoken`` files (backends.py explains why each is the faithful reader).
"""

from lmzoo.tokenizers.chat import BUILTIN_TEMPLATES, ChatEncoding
from lmzoo.tokenizers.loading import find_tokenizer, load_tokenizer
from lmzoo.tokenizers.tokenizer import BatchEncoding, Tokenizer
from lmzoo.tokenizers.training import RECIPES, train_tokenizer

__all__ = ["Tokenizer", "BatchEncoding", "ChatEncoding", "load_tokenizer", "find_tokenizer", "train_tokenizer",
           "RECIPES", "BUILTIN_TEMPLATES"]
