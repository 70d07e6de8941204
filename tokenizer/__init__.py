"""Stage one: the MGVQ multi-group VQ tokenizer (encoder -> G sub-codebooks -> decoder)."""
from tokenizer.model import PRESETS, MGVQTokenizer, TokenizerConfig, TokenizerOutput
from tokenizer.quantizer import MultiGroupQuantizer
from tokenizer.vqgan import VQGANConfig

__all__ = ["MGVQTokenizer", "TokenizerConfig", "TokenizerOutput", "MultiGroupQuantizer", "PRESETS", "VQGANConfig"]
