"""Caption features for text-conditional GPTs: a frozen T5 encoder through `transformers` (LlamaGen uses FLAN-T5-XL).

    enc = T5TextEncoder.from_pretrained("google/flan-t5-xl", max_length=120)   # hub id or a local folder
    feats, mask = enc(["a red sneaker", "a black bag"])   # (B, 120, 2048) float32, (B, 120) bool, left-padded
    codes = generator.generate(gpt, feats, cond_mask=mask, guidance_scale=7.5)

The tokenizer is `T5Tokenizer`, read from the checkpoint's sentencepiece model (`spiece.model`, converted by
`transformers` with the `sentencepiece` package) or its `tokenizer.json`. The encoder is frozen (eval, no gradients) and
runs in bfloat16 on CUDA (float32 on CPU) unless dtype= says otherwise. Features are LEFT-padded the way LlamaGen's
sample_t2i.py / dataset/t2i.py do it: T5 encodes right-padded captions with their attention mask, then each row's
valid tokens are moved to the end and the padding rows zeroed; the mask (True = valid) moves with them. This module is
the only place that imports transformers' T5; generator/ and tokenizer/ take feature tensors (or a callable).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

DEFAULT_MAX_LENGTH = 120  # LlamaGen's caption length (its released t2i GPTs have 120 caption positions)


def left_pad(feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T, D) features + (B, T) mask -> left-padded: each row's n valid tokens in its last n rows,
    padding rows zero (LlamaGen sample_t2i.py). A mask whose valid tokens are not a prefix is refused."""
    mask = mask.bool()
    B, T = mask.shape
    n = mask.sum(1)  # (B,)
    ar = torch.arange(T, device=mask.device)
    if not torch.equal(mask, ar[None] < n[:, None]):
        raise ValueError("left_pad: the mask must mark a prefix of valid tokens per row (right padding)")
    src = (ar[None] - (T - n)[:, None]) % T  # output row t reads input row t - (T - n)
    out = feats.gather(1, src[..., None].expand(-1, -1, feats.shape[-1]))
    new_mask = ar[None] >= (T - n)[:, None]
    return out * new_mask[..., None].to(out.dtype), new_mask


class T5TextEncoder:
    """A frozen T5 encoder + its tokenizer: prompts -> left-padded caption features and padding masks."""

    def __init__(self, model, tokenizer, max_length: int = DEFAULT_MAX_LENGTH):
        if int(max_length) < 1:
            raise ValueError(f"max_length={max_length}: must be a positive number of caption tokens")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_length: int = DEFAULT_MAX_LENGTH, device=None,
                        dtype: torch.dtype | str | None = None, *, revision: str | None = None,
                        cache_dir: str | None = None, local_files_only: bool = False) -> "T5TextEncoder":
        """Any T5 / FLAN-T5 checkpoint (T5EncoderModel + T5Tokenizer) by hub id or folder. device: default CUDA when
        available; dtype: default bfloat16 on CUDA, float32 elsewhere."""
        from transformers import T5EncoderModel, T5Tokenizer

        if os.path.sep in str(name_or_path) or str(name_or_path).startswith("."):
            if not os.path.isdir(name_or_path):
                raise FileNotFoundError(f"T5 text encoder: {name_or_path} is not a folder (give a folder with "
                                        f"config.json, model.safetensors and spiece.model / tokenizer.json, or a "
                                        f"hub id such as google/flan-t5-xl)")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            if dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"dtype={dtype!r}: valid: 'float32', 'bfloat16', 'float16'")
            dtype = getattr(torch, dtype)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        kw = {k: v for k, v in dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only).items()
              if v is not None}
        tokenizer = T5Tokenizer.from_pretrained(name_or_path, **kw)
        model = T5EncoderModel.from_pretrained(name_or_path, dtype=dtype, **kw).to(device)
        return cls(model, tokenizer, max_length)

    def save_pretrained(self, out_dir: str) -> None:
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)

    @property
    def dim(self) -> int:  # caption_dim of the features (T5's d_model)
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (features (B, max_length, dim) float32, mask (B, max_length) bool), left-padded, on the encoder's
        device. Longer captions are truncated to max_length tokens (the end-of-sequence token included)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings; got {prompts!r}")
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        feats = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return left_pad(feats, mask)

    __call__ = encode
