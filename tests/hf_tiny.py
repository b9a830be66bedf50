"""Test helpers: tiny random checkpoints in the exact HF layout (see lingjax.testing)."""
from lingjax.testing import random_hf_tensors, tiny_config, write_tiny_checkpoint  # noqa: F401
