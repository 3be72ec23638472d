"""lmzoo: the common LLM architectures built from one set of shared, readable blocks."""

from lmzoo.errors import CheckpointError, ConfigError, LmzooError
from lmzoo.generate import generate, stream
from lmzoo.interop.checkpoint import build, load, save
from lmzoo.models.reward import RewardModel, reward_model, score
from lmzoo.quant import quantize
from lmzoo.tokenizers import Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["load", "save", "build", "generate", "stream", "quantize", "reward_model", "score", "RewardModel", "load_tokenizer", "train_tokenizer", "Tokenizer", "LmzooError", "CheckpointError", "ConfigError"]
__version__ = "0.1.0"
