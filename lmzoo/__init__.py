"""lmzoo: the common LLM architectures built from one set of shared, readable blocks."""

from lmzoo.errors import CheckpointError, ConfigError, LmzooError
from lmzoo.generate import generate, stream
from lmzoo.interop.checkpoint import build, load, save

__all__ = ["load", "save", "build", "generate", "stream", "LmzooError", "CheckpointError", "ConfigError"]
__version__ = "0.1.0"
