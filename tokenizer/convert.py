"""LlamaGen VQ checkpoint -> MGVQTokenizer (G=1) folder.

    mgvq convert --from llamagen-vq vq_ds16_c2i.pt weights/llamagen-vq16 [key=value ...]
    python -m tokenizer.convert vq_ds16_c2i.pt weights/llamagen-vq16 image_size=256 --key ema

The architecture (ch, ch_mult, num_res_blocks, z_channels, K, C) is read from the state_dict shapes (reference B.8 keys);
key=value pairs override TokenizerConfig fields (dotted for nested ones, e.g. vqgan.norm_groups=32; values are YAML).
LlamaGen's module names equal ours, so every parameter loads unchanged; only the quantizer's usage buffers differ
(LlamaGen: codebook_used (65536,) float, reset here; no embed_prob).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

from tokenizer.model import MGVQTokenizer, TokenizerConfig, apply_overrides
from runtime.config import parse_overrides
from runtime.outdir import check_output_dir

CHECKPOINT_KEYS = ("model", "state_dict", "ema")
_IGNORED = ("quantize.codebook_used", "quantize.embed_prob")


def load_checkpoint_state_dict(path: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file or a .pt/.pth/.bin checkpoint (torch.load(weights_only=True)): the dict under
    `key`, else the first of "model", "state_dict", "ema" present, else the bare dict. Strips "module." (DDP) and
    "_orig_mod." (torch.compile) prefixes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
        if key is not None:
            if key not in ckpt:
                raise KeyError(f"{path}: no {key!r} entry; top-level keys: {sorted(ckpt)[:20]}")
            sd = ckpt[key]
        else:
            found = [k for k in CHECKPOINT_KEYS if isinstance(ckpt.get(k), dict)]
            sd = ckpt[found[0]] if found else ckpt
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{path}: no tensors found (top-level keys {CHECKPOINT_KEYS} or a bare state_dict expected)")
    return sd


def _count(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in sd if (m := pat.match(k))), default=-1)


def infer_llamagen_config(sd: dict[str, torch.Tensor]) -> dict:
    """TokenizerConfig kwargs of a LlamaGen VQModel state_dict."""
    need = ["encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight", "quant_conv.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise KeyError(f"not a LlamaGen VQ state_dict: missing {missing} (has e.g. {sorted(sd)[:5]})")
    ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
    levels = _count(sd, "encoder.conv_blocks.")
    ch_mult = [sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    n_codes, dim = sd["quantize.embedding.weight"].shape
    return dict(backbone="vqgan",
                vqgan=dict(ch=int(ch), ch_mult=ch_mult, num_res_blocks=_count(sd, "encoder.conv_blocks.0.res."),
                           z_channels=int(sd["encoder.conv_out.weight"].shape[0]), in_channels=int(in_ch)),
                latent_dim=int(dim), groups=1, codebook_size=int(n_codes), grouped_quant_conv=False,
                nested_keep_probs=None, dead_code_reinit=False, image_size=256)


def convert_llamagen_vq(state_dict: dict[str, torch.Tensor], overrides: dict | None = None) -> MGVQTokenizer:
    """A LlamaGen VQModel state_dict -> MGVQTokenizer with identical encode / decode (eval mode)."""
    cfg = TokenizerConfig.from_dict(apply_overrides(infer_llamagen_config(state_dict), overrides or {}))
    if cfg.groups != 1:
        raise ValueError(f"a LlamaGen VQ has one codebook; groups must stay 1, got {cfg.groups}")
    model = MGVQTokenizer(cfg)
    sd = {k: v for k, v in state_dict.items() if k not in _IGNORED}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in _IGNORED]
    if missing or unexpected:
        raise ValueError(f"LlamaGen VQ state_dict does not match the inferred architecture {cfg.vqgan}: "
                         f"missing {missing[:10]}, unexpected {unexpected[:10]}")
    return model.eval()



def run_cli(prog: str, convert_fn, describe, argv: list[str] | None, doc: str | None = None) -> int:
    """`mgvq convert --from KIND CHECKPOINT OUT_DIR [key=value ...] [--key K]` for a tokenizer converter:
    checks OUT_DIR up front, converts with `convert_fn(state_dict, overrides)`, saves, prints `describe(model)`."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint (.pt / .pth read with weights_only=True, or .safetensors)")
    p.add_argument("out_dir", help="output folder (MGVQTokenizer.from_pretrained)")
    p.add_argument("overrides", nargs="*", help="TokenizerConfig overrides key=value (e.g. image_size=384)")
    p.add_argument("--key", default=None, help="checkpoint entry holding the weights (default: model, state_dict, "
                                                "ema, or the bare dict)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides = dict(parse_overrides(args.overrides))
    except ValueError as e:
        p.error(str(e))
    check_output_dir(args.out_dir, what="OUT_DIR")  # before reading a multi-GB checkpoint
    model = convert_fn(load_checkpoint_state_dict(args.checkpoint, args.key), overrides)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_output_dir(args.out_dir, need_bytes=nbytes, what="OUT_DIR")  # room for the safetensors
    model.save_pretrained(args.out_dir)
    print(f"converted {args.checkpoint} -> {args.out_dir}: {model.num_parameters() / 1e6:.2f}M params, "
          f"{describe(model.config)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("mgvq convert --from llamagen-vq", convert_llamagen_vq,
                   lambda c: f"ch={c.vqgan.ch} ch_mult={list(c.vqgan.ch_mult)} f={c.downsample} "
                             f"K={c.codebook_size} C={c.latent_dim}", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
