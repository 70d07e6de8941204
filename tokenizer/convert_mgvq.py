"""Released MGVQ tokenizer checkpoint (MKJia/MGVQ, DC-AE backbone) -> MGVQTokenizer folder.

    mgvq convert --from mgvq-tokenizer mgvq_f16c32_g4.pt weights/mgvq-f16-g4 [key=value ...]
    python -m tokenizer.convert_mgvq mgvq_f16c32_g4.pt weights/mgvq-f16-g4 image_size=512

The released .pt files carry the weights under "model" (read with torch.load(weights_only=True)). The architecture is
read from the state_dict keys and shapes (reference A.1 / A.5): stage widths and depths, block types (ResBlock /
EViT_GLU), norms (running_mean present -> bn2d, else trms2d), G from quant_conv's grouped weight, K per group from
quantize.embedding.weight. Activations are not in the weights: BatchNorm stages use ReLU and RMS-norm stages SiLU, as in
every released config. key=value pairs override TokenizerConfig fields (dotted for nested ones, e.g.
dcae.decoder_out_act=silu; values are YAML). Module names equal the reference's, so every weight loads unchanged; the
usage queue quantize.codebook_used ((G, 65536) float, all zeros = never filled) becomes our (G, window) int64 ring buffer.
"""
from __future__ import annotations

import re
import sys

import torch

from tokenizer.convert import run_cli
from tokenizer.model import MGVQTokenizer, TokenizerConfig, apply_overrides

REQUIRED = ("encoder.project_out.main.op_list.0.conv.weight", "decoder.project_in.main.conv.weight",
            "quant_conv.weight", "post_quant_conv.weight", "quantize.embedding.weight")


_KINDS = (("main.conv1.", "ResBlock"), ("main.conv2.", "ResBlock"), ("context_module.", "EViT_GLU"),
          ("local_module.", "EViT_GLU"), ("main.conv.", "resample"))


def _stage_ops(sd: dict, part: str, s: int) -> dict[int, str]:
    """op index -> "ResBlock" | "EViT_GLU" | "resample" for {part}.stages.{s}."""
    pre = f"{part}.stages.{s}.op_list."
    ops = {}
    for k in sd:
        if k.startswith(pre):
            i, rest = k[len(pre):].split(".", 1)
            kind = next((kind for prefix, kind in _KINDS if rest.startswith(prefix)), None)
            if kind is None or ops.get(int(i), kind) != kind:
                raise ValueError(f"unrecognised MGVQ key {k!r} (expected a ResBlock, EViT_GLU or resampler entry)")
            ops[int(i)] = kind
    return dict(sorted(ops.items()))


def _block_norm(sd: dict, prefix: str, kind: str) -> str:
    norm = prefix + ("main.conv2.norm." if kind == "ResBlock" else "context_module.main.proj.norm.")
    return "bn2d" if norm + "running_mean" in sd else "trms2d"


def infer_mgvq_config(sd: dict[str, torch.Tensor]) -> dict:
    """TokenizerConfig kwargs of a released MGVQ state_dict."""
    missing = [k for k in REQUIRED if k not in sd]
    if missing:
        raise KeyError(f"not an MGVQ (DC-AE) tokenizer state_dict: missing {missing} (has e.g. {sorted(sd)[:5]})")
    stage_ids = {int(m.group(1)) for k in sd if (m := re.match(r"(?:en|de)coder\.stages\.(\d+)\.", k))}
    if not stage_ids:
        raise ValueError("MGVQ state_dict has no encoder.stages.* / decoder.stages.* keys")
    n = max(stage_ids) + 1
    widths, enc_depth, dec_depth = [0] * n, [0] * n, [0] * n
    blocks, dec_norm, enc_norms = [None] * n, [None] * n, set()
    expand = None
    for part in ("encoder", "decoder"):
        for s in range(n):
            ops = _stage_ops(sd, part, s)
            for i, kind in ops.items():
                p = f"{part}.stages.{s}.op_list.{i}."
                if kind == "resample":
                    continue
                if blocks[s] not in (None, kind):
                    raise ValueError(f"stage {s} mixes block types ({blocks[s]} and {kind} at {p}); unsupported")
                blocks[s] = kind
                if kind == "ResBlock":
                    w = sd[p + "main.conv1.conv.weight"].shape[0]
                else:
                    w = sd[p + "context_module.main.qkv.conv.weight"].shape[1]
                    e = sd[p + "local_module.main.inverted_conv.conv.weight"].shape[0] // (2 * w)
                    if expand not in (None, e):
                        raise ValueError(f"GLUMBConv expand ratio differs between blocks ({expand} vs {e} at {p})")
                    expand = e
                if widths[s] not in (0, w):
                    raise ValueError(f"stage {s} width differs between blocks ({widths[s]} vs {w} at {p})")
                widths[s] = int(w)
                norm = _block_norm(sd, p, kind)
                if part == "encoder":
                    enc_depth[s] += 1
                    enc_norms.add(norm)
                else:
                    dec_depth[s] += 1
                    if dec_norm[s] not in (None, norm):
                        raise ValueError(f"decoder stage {s} mixes norms ({dec_norm[s]} and {norm} at {p})")
                    dec_norm[s] = norm
    if len(enc_norms) > 1:
        raise ValueError(f"encoder stages use several norms {sorted(enc_norms)}; dcae.encoder_norm is one norm")
    proj_in = sd.get("encoder.project_in.conv.conv.weight", sd.get("encoder.project_in.conv.weight"))
    if proj_in is None:
        raise KeyError("MGVQ state_dict has no encoder.project_in.conv(.conv).weight")
    if widths[0] == 0:  # stage 0 empty (every released config): its width is unused; the reference uses w1 / 2
        widths[0] = widths[1] // 2
    enc_norm = enc_norms.pop() if enc_norms else "trms2d"
    dec_norm = [nm or "bn2d" for nm in dec_norm]
    out_norm_w = sd.get("decoder.project_out.op_list.0.weight")
    out_norm = None if out_norm_w is None or out_norm_w.dim() != 1 else (
        "bn2d" if "decoder.project_out.op_list.0.running_mean" in sd else "trms2d")
    dcae = dict(width_list=widths, encoder_depth_list=enc_depth, decoder_depth_list=dec_depth,
                block_type=[b or "ResBlock" for b in blocks], encoder_norm=enc_norm,
                encoder_act="relu" if enc_norm == "bn2d" else "silu", decoder_norm=dec_norm,
                decoder_act=["relu" if nm == "bn2d" else "silu" for nm in dec_norm], decoder_out_norm=out_norm,
                decoder_out_act="relu", in_channels=int(proj_in.shape[1]), expand_ratio=int(expand or 4))

    C = int(sd["quant_conv.weight"].shape[0])
    n_codes, e_dim = (int(x) for x in sd["quantize.embedding.weight"].shape)
    if C % e_dim:
        raise ValueError(f"quantize.embedding.weight dim {e_dim} does not divide the latent dim {C} (quant_conv)")
    G = C // e_dim
    if n_codes % G:
        raise ValueError(f"quantize.embedding.weight has {n_codes} rows, not a multiple of groups G={G}")
    q_in = int(sd["quant_conv.weight"].shape[1])
    if q_in not in (e_dim, C):
        raise ValueError(f"quant_conv.weight {tuple(sd['quant_conv.weight'].shape)}: input channels must be "
                         f"C/G={e_dim} (grouped) or C={C}")
    return dict(backbone="dcae", dcae=dcae, latent_dim=C, groups=G, codebook_size=n_codes // G,
                grouped_quant_conv=q_in == e_dim and G > 1, nested_keep_probs="default", dead_code_reinit=True,
                image_size=256)


def _usage_window(queue: torch.Tensor, groups: int, window: int) -> torch.Tensor:
    """Reference (G, L) float queue of used indices (chronological, zeros when never filled) -> (G, window) int64 ring
    buffer (-1 = empty). All-zero rows are empty; a shorter window keeps the newest entries."""
    q = queue.reshape(groups, -1).round().long()
    q[(queue.reshape(groups, -1) == 0).all(-1)] = -1
    if q.shape[1] >= window:
        return q[:, -window:].clone()
    return torch.cat([q.new_full((groups, window - q.shape[1]), -1), q], dim=1)


def convert_mgvq_tokenizer(state_dict: dict[str, torch.Tensor], overrides: dict | None = None) -> MGVQTokenizer:
    """A released MGVQ state_dict -> MGVQTokenizer with identical encode / decode (eval mode)."""
    cfg = TokenizerConfig.from_dict(apply_overrides(infer_mgvq_config(state_dict), overrides or {}))
    if cfg.backbone != "dcae":
        raise ValueError(f"released MGVQ tokenizers use the dcae backbone; backbone={cfg.backbone!r} cannot hold them")
    model = MGVQTokenizer(cfg)
    sd = dict(state_dict)
    if "quantize.codebook_used" in sd:
        sd["quantize.codebook_used"] = _usage_window(sd["quantize.codebook_used"], cfg.groups, cfg.usage_window)
    if "quantize.embed_prob" in sd:
        sd["quantize.embed_prob"] = sd["quantize.embed_prob"].reshape(cfg.groups, cfg.codebook_size).float()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in ("quantize.codebook_used", "quantize.embed_prob")]
    if missing or unexpected:
        raise ValueError(f"MGVQ state_dict does not match the inferred architecture {cfg.dcae}: "
                         f"missing {missing[:10]}, unexpected {unexpected[:10]}")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    return run_cli("mgvq convert --from mgvq-tokenizer", convert_mgvq_tokenizer,
                   lambda c: f"widths={c.dcae['width_list']} enc={c.dcae['encoder_depth_list']} "
                             f"dec={c.dcae['decoder_depth_list']} f={c.downsample} G={c.groups} "
                             f"K={c.codebook_size} C={c.latent_dim}", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
