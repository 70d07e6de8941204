"""Convert LlamaGen c2i GPT and released MGVQ GPT checkpoints into this project's folders (safetensors + config.json).

    mgvq convert --from llamagen-gpt c2i_L_256.pt weights/llamagen-gpt-l grid=16
    mgvq convert --from mgvq-gpt MGVQ_GPT_XXL.pt weights/mgvq-gpt-xxl --tokenizer weights/mgvq-f16-g4
    mgvq convert --from llamagen-gpt-t2i t2i_XL_stage1_256.pt weights/llamagen-t2i-xl   # text-conditional (T5 prefix)
    python -m generator.convert --from mgvq-gpt CKPT OUT --codebook codebook.safetensors [key=value ...]

Everything else (dim, n_layer, K, G, C, num_classes, n_kv_head, the SwiGLU width, grid for MGVQ) is inferred from
the weights (a GPT built with another multiple_of / ffn_dim_multiplier converts as it is);
key=value pairs override GPTConfig fields (e.g. grid=24, n_head=16, dropouts).

Codebook for the MGVQ projector input (the generator never imports tokenizer/):
  --codebook FILE.safetensors  one tensor, or the key "codebook", "quantize.embedding.weight" or
                               "state_dict.quantize.embedding.weight": raw code vectors (G*K, C/G) or (G, K, C/G)
  --tokenizer DIR              a tokenizer folder: DIR/model.safetensors key "quantize.embedding.weight"
                               (raw, unnormalised rows, group g owning rows [g*K, (g+1)*K)) and DIR/config.json
                               field "groups" (checked against the GPT). This is the contract with tokenizer/.
Checkpoints are read with torch.load(weights_only=True) or safetensors; nothing in them is executed.

Sampling a converted MGVQ GPT like MGVQ's demo_gen.sh: its sample_c2i.py `--top-k 12` is log2 (2**12 codes per
sub-codebook), i.e. `mgvq sample ... --top-k 4096` / `pipe(..., top_k=4096)` here (or one count per group:
`--top-k 4096,4096,4096,4096`); `--from pipeline ... top_k=4096` stores it as the pipeline's default.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch

from .model import GPT, GPTConfig
from runtime.config import parse_overrides
from runtime.outdir import check_output_dir

# LlamaGen presets by width: dim -> n_head (gpt.py GPT_models)
LLAMAGEN_HEADS = {768: 12, 1024: 16, 1280: 20, 1536: 24, 2560: 40, 2048: 32, 3200: 32, 4096: 32}
# Released c2i GPT-XL / XXL / 3B exist only at 384 px (24 x 24 tokens)
LLAMAGEN_GRID_BY_DIM = {1280: 24, 1536: 24, 3200: 24}


def unwrap_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """Accept {"model": sd} / {"module": sd} / {"state_dict": sd} / {"ema": sd} / a raw (FSDP) state dict;
    strip DDP "module." and torch.compile "_orig_mod." prefixes; drop freqs_cis and non-tensors."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint is a {type(ckpt).__name__}, expected a dict (a state dict or a wrapper of one)")
    for key in ("model", "module", "state_dict", "ema"):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    sd = {}
    for k, v in ckpt.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        if k == "freqs_cis" or k.endswith(".freqs_cis"):
            continue
        sd[k] = v
    if not sd:
        raise ValueError("no tensors found in the checkpoint (looked under 'model', 'module', 'state_dict', 'ema' "
                         "and at the top level)")
    return sd


def _n_layer(sd: dict, prefix: str = "layers.") -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not idx:
        raise ValueError(f"no '{prefix}<i>.' keys in the state dict; is this a GPT checkpoint?")
    return max(idx) + 1


def _require(sd: dict, keys: list[str], kind: str):
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"{kind}: missing keys {missing}; found e.g. {sorted(sd)[:8]}")


def _backbone_config(sd: dict, overrides: dict, kind: str) -> dict:
    text = "cls_embedding.cap_proj.fc1.weight" in sd  # t2i: a caption projection instead of the class table
    _require(sd, ["cls_embedding.cap_proj.fc1.weight" if text else "cls_embedding.embedding_table.weight",
                  "norm.weight", "layers.0.attention.wqkv.weight", "layers.0.feed_forward.w1.weight"], kind)
    dim = sd["norm.weight"].shape[0]
    n_head = int(overrides.get("n_head") or LLAMAGEN_HEADS.get(dim, 0))
    if not n_head:
        raise ValueError(f"{kind}: cannot infer n_head for dim={dim}; pass n_head=... (LlamaGen widths: "
                         f"{LLAMAGEN_HEADS})")
    hd = dim // n_head
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
    n_kv_head = (qkv_rows - dim) // (2 * hd)
    cfg = dict(dim=dim, n_layer=_n_layer(sd), n_head=n_head, n_kv_head=None if n_kv_head == n_head else n_kv_head)
    if not text:
        cfg["num_classes"] = sd["cls_embedding.embedding_table.weight"].shape[0] - 1
    cfg.update(_ffn_fields(sd, cfg, overrides, kind))
    return cfg


def _ffn_fields(sd: dict, cfg: dict, overrides: dict, kind: str) -> dict:
    """multiple_of / ffn_dim_multiplier that give the SwiGLU width the weights have (w1: (hidden, dim)).

    LlamaGen computes hidden = find_multiple(int(ffn_dim_multiplier * int(8 * dim / 3)), multiple_of); a checkpoint
    built with another multiple_of (or a multiplier) has another width. The weights fix the width, so it is read
    from them: the largest power-of-two multiple_of that reproduces it (256, LlamaGen's default, when it does), else a
    multiplier. Explicit multiple_of= / ffn_dim_multiplier= overrides must reproduce it too."""
    hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
    widths = {sd[k].shape[0] for k in sd if re.fullmatch(r"layers\.\d+\.feed_forward\.w1\.weight", k)}
    if len(widths) != 1:
        raise ValueError(f"{kind}: the layers have different SwiGLU widths {sorted(widths)}; GPTConfig has one width")
    for k in ("w3", "w2"):
        shape = tuple(sd[f"layers.0.feed_forward.{k}.weight"].shape)
        want = (hidden, cfg["dim"]) if k == "w3" else (cfg["dim"], hidden)
        if shape != want:
            raise ValueError(f"{kind}: layers.0.feed_forward.{k}.weight is {shape}, expected {want} (w1 gives the "
                             f"SwiGLU width {hidden})")

    def width(multiple_of, multiplier):
        return GPTConfig(**{**cfg, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}).ffn_hidden

    if "multiple_of" in overrides or "ffn_dim_multiplier" in overrides:
        m, f = overrides.get("multiple_of", 256), overrides.get("ffn_dim_multiplier")
        if width(m, f) != hidden:
            raise ValueError(f"{kind}: multiple_of={m}, ffn_dim_multiplier={f} give a SwiGLU width of {width(m, f)}, "
                             f"but the weights have {hidden} (layers.0.feed_forward.w1.weight); drop both overrides "
                             f"and the width is taken from the weights")
        return {"multiple_of": m, "ffn_dim_multiplier": f}
    base = int(2 * (4 * cfg["dim"]) / 3)
    powers = [256] + [2 ** i for i in range(12, -1, -1) if i != 8]  # LlamaGen's 256 first, then 4096 ... 1
    for multiplier in (None, hidden / base, (hidden + 0.5) / base):
        for m in powers:
            if width(m, multiplier) == hidden:
                return {"multiple_of": m, "ffn_dim_multiplier": multiplier}
    raise ValueError(f"{kind}: no multiple_of / ffn_dim_multiplier reproduces the SwiGLU width {hidden} for dim="
                     f"{cfg['dim']}")  # unreachable: (hidden + 0.5) / base with multiple_of=1 always does


def _finish(cfg: dict, overrides: dict, sd: dict, codebook=None) -> GPT:
    cfg = {**cfg, **overrides}
    model = GPT(GPTConfig.from_dict(cfg), codebook=codebook)
    if codebook is not None:
        sd = {**sd, "codebook": model.codebook}
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model


def convert_llamagen_gpt(state_dict: dict, overrides: dict | None = None) -> GPT:
    """LlamaGen c2i `Transformer` -> GPT (G=1, input "sum", head "parallel"). Keys map one to one.

    Inferred: dim, n_layer, codebook_size, num_classes, n_kv_head, SwiGLU width (multiple_of / ffn_dim_multiplier);
    n_head from the LlamaGen preset of that width;
    grid from freqs_cis if the checkpoint has it, else overrides["grid"], else 24 for XL/XXL/3B (384-only releases).
    """
    overrides = dict(overrides or {})
    raw = state_dict.get("model", state_dict.get("module", state_dict.get("state_dict", state_dict)))
    freqs = raw.get("freqs_cis") if isinstance(raw, dict) else None
    sd = unwrap_state_dict(state_dict)
    kind = "convert_llamagen_gpt"
    _require(sd, ["tok_embeddings.weight", "output.weight"], kind)
    if any(k.startswith("ar_head.") or k.startswith("img_projector.") for k in sd):
        raise ValueError(f"{kind}: this is an MGVQ GPT (ar_head/img_projector keys); use convert_mgvq_gpt")
    if "cls_embedding.cap_proj.fc1.weight" in sd:
        raise ValueError(f"{kind}: this is a text-conditional (t2i) GPT (cls_embedding.cap_proj keys); use "
                         f"--from llamagen-gpt-t2i")
    cfg = _backbone_config(sd, overrides, kind)
    cfg.update(groups=1, codebook_size=sd["tok_embeddings.weight"].shape[0], input_mode="sum", head="parallel")
    if "grid" not in overrides:
        if isinstance(freqs, torch.Tensor) and math.isqrt(freqs.shape[0] - 1) ** 2 == freqs.shape[0] - 1:
            cfg["grid"] = math.isqrt(freqs.shape[0] - 1)
        elif cfg["dim"] in LLAMAGEN_GRID_BY_DIM:
            cfg["grid"] = LLAMAGEN_GRID_BY_DIM[cfg["dim"]]
        else:
            raise ValueError(f"{kind}: the weights do not fix the token grid for dim={cfg['dim']}; pass grid=16 "
                             f"(256 px checkpoints) or grid=24 (384 px)")
    return _finish(cfg, overrides, sd)


def convert_llamagen_gpt_t2i(state_dict: dict, overrides: dict | None = None) -> GPT:
    """LlamaGen t2i `Transformer` (model_type="t2i", CaptionEmbedder) -> GPT(conditioning="text"). Keys map one to one.

    Inferred: dim, n_layer, codebook_size, n_kv_head, SwiGLU width, caption_dim (cap_proj.fc1 input) and caption_tokens
    (= the rows of cls_embedding.uncond_embedding = LlamaGen's cls_token_num, 120 in the released models); n_head from
    the LlamaGen preset of that width. grid is not in the weights: pass grid= (the CLI reads it from a released name,
    t2i_XL_stage1_256.pt -> 16, t2i_XL_stage2_512.pt -> 32)."""
    overrides = dict(overrides or {})
    sd = unwrap_state_dict(state_dict)
    kind = "convert_llamagen_gpt_t2i"
    _require(sd, ["tok_embeddings.weight", "output.weight", "cls_embedding.uncond_embedding",
                  "cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight"], kind)
    if "cls_embedding.embedding_table.weight" in sd:
        raise ValueError(f"{kind}: this is a class-conditional (c2i) GPT (cls_embedding.embedding_table); use "
                         f"--from llamagen-gpt")
    cfg = _backbone_config(sd, overrides, kind)
    fc1, unc = sd["cls_embedding.cap_proj.fc1.weight"], sd["cls_embedding.uncond_embedding"]
    if fc1.shape[0] != cfg["dim"] or unc.shape[1] != fc1.shape[1]:
        raise ValueError(f"{kind}: cap_proj.fc1.weight is {tuple(fc1.shape)} and uncond_embedding "
                         f"{tuple(unc.shape)}; LlamaGen's layout is fc1 (dim={cfg['dim']}, caption_dim) and "
                         f"uncond_embedding (caption_tokens, caption_dim)")
    cfg.update(groups=1, codebook_size=sd["tok_embeddings.weight"].shape[0], input_mode="sum", head="parallel",
               conditioning="text", caption_dim=fc1.shape[1], caption_tokens=unc.shape[0])
    for key in ("caption_dim", "caption_tokens"):
        if key in overrides and overrides[key] != cfg[key]:
            raise ValueError(f"{kind}: {key}={overrides[key]} given, but the weights have {key}={cfg[key]}")
    if "grid" not in overrides:
        raise ValueError(f"{kind}: the weights do not fix the token grid; pass grid=16 (256 px: t2i_XL_stage1_256) "
                         f"or grid=32 (512 px: t2i_XL_stage2_512)")
    return _finish(cfg, overrides, sd)


def convert_mgvq_gpt(state_dict: dict, codebook: torch.Tensor, overrides: dict | None = None) -> GPT:
    """MGVQ `Transformer` + `AR_Head` (gpt_emb_simple.py) -> GPT (input "projector", head "ar").

    codebook: the tokenizer's RAW code vectors (G*K, C/G) or (G, K, C/G) (quantize.embedding.weight).
    Inferred: dim, n_layer, groups (dim / AR-head head_dim), codebook_size, codebook_embed_dim, num_classes,
    grid (sqrt of ar_head.pos_emb rows = block_size), ar_head_layers. The unused adaLN_modulation is dropped.
    """
    overrides = dict(overrides or {})
    sd = unwrap_state_dict(state_dict)
    kind = "convert_mgvq_gpt"
    _require(sd, ["img_projector.0.weight", "ar_head.tok_emb.weight", "ar_head.pos_emb",
                  "ar_head.causal_space_blocks.0.attention.q_norm.weight"], kind)
    sd = {k: v for k, v in sd.items() if ".adaLN_modulation." not in k}
    cfg = _backbone_config(sd, overrides, kind)
    dim = cfg["dim"]
    groups = dim // sd["ar_head.causal_space_blocks.0.attention.q_norm.weight"].shape[0]
    L = sd["ar_head.pos_emb"].shape[1]
    cfg.update(groups=groups, codebook_size=sd["ar_head.tok_emb.weight"].shape[0], input_mode="projector",
               head="ar", codebook_embed_dim=sd["img_projector.0.weight"].shape[1],
               ar_head_layers=_n_layer(sd, "ar_head.causal_space_blocks."))
    # sizes the weights fix but GPTConfig derives from dim: refuse loudly instead of a bare size-mismatch error
    for key, want, what in (("img_projector.0.weight", (dim // 2, cfg["codebook_embed_dim"]), "projector hidden D/2"),
                            ("ar_head.causal_space_blocks.0.feed_forward.w1.weight", (4 * dim, dim),
                             "AR-head SwiGLU width 4*D")):
        if key in sd and tuple(sd[key].shape) != want:
            raise ValueError(f"{kind}: {key} is {tuple(sd[key].shape)}, but this GPT has {what} = {want} for "
                             f"dim={dim} (MGVQ's gpt_emb_simple.py / ar_head.py); the checkpoint is not MGVQ's layout")
    if "grid" not in overrides:
        if math.isqrt(L) ** 2 != L:
            raise ValueError(f"{kind}: ar_head.pos_emb has {L} rows, not a square grid; pass grid=...")
        cfg["grid"] = math.isqrt(L)
    if codebook is None:
        raise ValueError(f"{kind}: needs the tokenizer codebook (raw quantize.embedding.weight) for the projector")
    return _finish(cfg, overrides, sd, codebook=codebook)


# -------------------------------------------------------------------------------------------------------------- CLI


def _load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_codebook_file(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    sd = load_file(path)
    for key in ("codebook", "quantize.embedding.weight", "state_dict.quantize.embedding.weight"):
        if key in sd:
            return sd[key]
    if len(sd) == 1:
        return next(iter(sd.values()))
    raise ValueError(f"--codebook {path}: no 'codebook' / 'quantize.embedding.weight' key and more than one tensor "
                     f"({sorted(sd)[:10]})")


def load_tokenizer_codebook(tok_dir: str) -> tuple[torch.Tensor, int | None]:
    """Read DIR/model.safetensors['quantize.embedding.weight'] and DIR/config.json['groups'] (no tokenizer import)."""
    from safetensors import safe_open

    w, c = os.path.join(tok_dir, "model.safetensors"), os.path.join(tok_dir, "config.json")
    if not os.path.isfile(w):
        raise FileNotFoundError(f"--tokenizer {tok_dir}: {w} not found")
    with safe_open(w, "pt") as f:
        keys = list(f.keys())
        if "quantize.embedding.weight" not in keys:
            raise ValueError(f"--tokenizer {tok_dir}: model.safetensors has no 'quantize.embedding.weight' "
                             f"(keys like {[k for k in keys if 'quantize' in k][:10]})")
        cb = f.get_tensor("quantize.embedding.weight")
    groups = None
    if os.path.isfile(c):
        with open(c) as fh:
            groups = json.load(fh).get("groups")
    return cb, groups



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mgvq convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="kind", required=True, choices=["llamagen-gpt", "llamagen-gpt-t2i", "mgvq-gpt"])
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--codebook", help="safetensors file with the raw tokenizer codebook (mgvq-gpt)")
    p.add_argument("--tokenizer", help="tokenizer folder (model.safetensors + config.json) (mgvq-gpt)")
    p.add_argument("overrides", nargs="*", help="GPTConfig overrides key=value, e.g. grid=24")
    args = p.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        overrides = dict(parse_overrides(args.overrides))
    except ValueError as e:
        p.error(str(e))
    check_output_dir(args.out_dir, what="OUT_DIR")  # before reading a multi-GB checkpoint
    ckpt = _load_checkpoint(args.checkpoint)
    if args.kind in ("llamagen-gpt", "llamagen-gpt-t2i"):
        if "grid" not in overrides:  # released names carry the resolution: c2i_L_256.pt / t2i_XL_stage2_512.pt
            m = re.search(r"_(256|384|512)\b", os.path.basename(args.checkpoint))
            if m:
                overrides["grid"] = int(m.group(1)) // 16
        convert = convert_llamagen_gpt if args.kind == "llamagen-gpt" else convert_llamagen_gpt_t2i
        model = convert(ckpt, overrides)
    else:
        if bool(args.codebook) == bool(args.tokenizer):
            p.error("mgvq-gpt needs exactly one of --codebook FILE.safetensors or --tokenizer DIR")
        groups = None
        if args.tokenizer:
            cb, groups = load_tokenizer_codebook(args.tokenizer)
        else:
            cb = load_codebook_file(args.codebook)
        model = convert_mgvq_gpt(ckpt, cb, overrides)
        if groups is not None and groups != model.config.groups:
            raise ValueError(f"tokenizer config groups={groups} but the GPT's AR head has {model.config.groups} groups")
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_output_dir(args.out_dir, need_bytes=nbytes, what="OUT_DIR")  # room for the safetensors
    model.save_pretrained(args.out_dir)
    c = model.config
    print(f"converted {args.kind} -> {args.out_dir}: {model.num_parameters() / 1e6:.1f}M params, dim={c.dim} "
          f"n_layer={c.n_layer} n_head={c.n_head} grid={c.grid} G={c.groups} K={c.codebook_size} head={c.head}"
          + (f" caption {c.caption_tokens} x {c.caption_dim}" if c.conditioning == "text" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
