"""Checkpoint interop: Hugging Face layout directories in and out, safetensors only."""
