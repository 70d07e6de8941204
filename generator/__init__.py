"""Stage two: class-conditional GPT over MGVQ sub-tokens (never imports tokenizer/; takes a codebook tensor)."""
from .generate import generate, sample_logits
from .model import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS", "generate", "sample_logits"]
