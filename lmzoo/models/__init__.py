"""Model families, each in its own folder; ``registry`` is the only place they are listed."""
