"""The one exception type lmzoo raises at its boundaries (checkpoints, configs, inputs)."""


class LmzooError(ValueError):
    """A clear, user-facing error: the message names the file, the key and what was expected."""


class CheckpointError(LmzooError):
    """A checkpoint on disk is missing, truncated, or does not match the model it should build."""


class ConfigError(LmzooError):
    """A config (ours or a Hugging Face ``config.json``) holds a value lmzoo cannot honour."""
