"""Which generator head for the demo: per-group parallel heads vs MGVQ's projector input + AR head.

On the demo's own Fashion-MNIST codes (its classifier, tokenizer and code-cache stages, run once through
pipelines.demo's functions and reused on reruns), train the GPT with each head at about equal parameters and the same
steps / batch / lr, then score samples like the demo does: conditional accuracy of the demo classifier with and without
CFG, the classifier-feature Frechet distance to the real test split (real-vs-real and reconstruction-vs-real as floors),
and sampling speed. Prints one table and writes <out>/heads.json.

    python bench/demo_heads.py --out runs/demo_heads --threads 1                  # the demo's default profile
    python bench/demo_heads.py --out runs/demo_heads --steps 3000 --batch 64      # same codes, other generator settings
    python bench/demo_heads.py --out runs/demo_heads --variants parallel --cfg 3 4 5 --top-k 0 128

Variants (the backbone width / heads / steps / batch / lr come from the demo profile unless overridden):
  parallel      input "sum" (G embedding tables), head "parallel" (G linear heads), n_layer from the profile
  projector-ar  input "projector" (frozen raw tokenizer codebook -> MLP), head "ar"; backbone depth and AR-head depth
                chosen so the parameter count is closest to the parallel variant's (the AR head is the bigger head)
Sampling speed: images/s of MGVQPipeline.__call__ (generation + decode) for all eval images in one batch, with CFG.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator import GPT  # noqa: E402
from pipelines import demo as D  # noqa: E402
from pipelines import MGVQPipeline  # noqa: E402
from pipelines.classifier import classifier_fd, load_or_train, predict  # noqa: E402


def count_params(model_args: dict, G: int, K: int, grid: int, num_classes: int) -> int:
    """Parameters of GPT-tiny with these overrides (built on the meta device; buffers such as the codebook excluded)."""
    with torch.device("meta"):
        m = GPT.from_preset("GPT-tiny", groups=G, codebook_size=K, grid=grid, num_classes=num_classes, **model_args)
    return sum(p.numel() for p in m.parameters())


def variant_args(name: str, base: dict, G: int, K: int, grid: int, num_classes: int) -> dict:
    """GPTConfig overrides of a variant; projector-ar gets the backbone / AR-head depth closest to parallel's size."""
    common = {**base, "token_dropout_p": 0.0, "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0, "class_dropout_prob": 0.1}
    par = {**common, "input_mode": "sum", "head": "parallel"}
    if name == "parallel":
        return par
    if name != "projector-ar":
        raise SystemExit(f"unknown variant {name!r}; valid: parallel, projector-ar")
    target = count_params(par, G, K, grid, num_classes)
    candidates = [{**common, "input_mode": "projector", "head": "ar", "n_layer": n, "ar_head_layers": h}
                  for n, h in itertools.product(range(1, base["n_layer"] + 1), (1, 2))]
    return min(candidates, key=lambda a: (abs(count_params(a, G, K, grid, num_classes) - target), -a["n_layer"]))


def train_variant(out: Path, codes_dir: Path, tok_dir: Path, model_args: dict, p: dict, seed: int) -> tuple[Path, float]:
    """generator.train on the cached codes (stage reused when its settings match); returns (final dir, seconds)."""
    from generator.train import TrainConfig, train

    settings = {"args": model_args, "steps": p["gen_steps"], "batch": p["gen_batch"], "lr": p["gen_lr"],
                "warmup": p["gen_warmup"], "seed": seed, "codes": json.loads((codes_dir / "meta.json").read_text())
                ["tokenizer"]["weights_sha256"]}
    if D.stage_done(out, settings, ["final/model.safetensors", "train_seconds.json"]):
        return out / "final", json.loads((out / "train_seconds.json").read_text())["seconds"]
    cfg = TrainConfig(model="GPT-tiny", model_overrides=dict(model_args), data=str(codes_dir), view="random",
                      num_workers=0, global_batch_size=p["gen_batch"], batch_size=p["gen_batch"], lr=p["gen_lr"],
                      lr_schedule="cosine", warmup_steps=p["gen_warmup"], min_lr=p["gen_lr"] * 0.05,
                      weight_decay=0.05, steps=p["gen_steps"], precision="fp32", out_dir=str(out), resume="none",
                      save_every=p["gen_steps"], keep_checkpoints=1, log_every=50, log_with="none", sample_every=0,
                      seed=seed, codebook=str(tok_dir) if model_args["input_mode"] == "projector" else None)
    t0 = time.time()
    train(cfg)
    secs = time.time() - t0
    (out / "train_seconds.json").write_text(json.dumps({"seconds": secs}))
    D.mark_done(out, settings)
    return out / "final", secs


@torch.no_grad()
def score(pipe, clf, labels: list[int], real_feats, guidance: float, seed: int, **sampling) -> dict:
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    imgs = pipe(labels, guidance_scale=guidance, generator=g, output_type="pt", batch_size=len(labels),
                progress=False, **sampling).images
    secs = time.time() - t0
    logits, feats = predict(clf, imgs)
    y = torch.tensor(labels)
    return {"cond_accuracy": float((logits.argmax(-1) == y).float().mean()),
            "classifier_fd": classifier_fd(real_feats, feats), "images_per_s": len(labels) / secs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo_heads")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["parallel", "projector-ar"])
    ap.add_argument("--steps", type=int, help="generator steps (default: the demo profile's)")
    ap.add_argument("--batch", type=int, help="generator batch (default: the demo profile's)")
    ap.add_argument("--lr", type=float, help="generator peak lr (default: the demo profile's)")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--cfg", type=float, nargs="+", help="CFG scales to score (default: the demo profile's)")
    ap.add_argument("--top-k", type=int, nargs="+", default=[0], help="top-k values to score (0 = off)")
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    ap.add_argument("--per-class", type=int, help="samples per class (default: the demo profile's)")
    ap.add_argument("--cache-limit", type=int, help="training images cached for the generator, 0 = all (default: the "
                                                    "demo profile's); a new value re-caches, so give it its own --out")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    p = dict(D.PROFILES["default"])
    for k, v in (("gen_steps", a.steps), ("gen_batch", a.batch), ("gen_lr", a.lr), ("eval_per_class", a.per_class)):
        if v is not None:
            p[k] = v
    if a.cache_limit is not None:
        p["cache_limit"] = a.cache_limit or None
    base = dict(p["gen_args"])
    base.pop("head", None), base.pop("input_mode", None), base.pop("ar_head_layers", None)
    if a.dim:
        base["dim"] = a.dim
    if a.n_layer:
        base["n_layer"] = a.n_layer
    cfgs = a.cfg or [p["guidance_scale"]]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    # the demo's stages 1-3, reused when their settings match
    data_path = D.find_data(a.data_dir)
    x_train, y_train, names = D.load_split(data_path, "train", p["num_train"])
    x_test, y_test, _ = D.load_split(data_path, "test", p["num_test"])
    clf, _ = load_or_train(str(out / "classifier"), x_train, y_train, x_test, y_test, steps=p["clf_steps"],
                           batch_size=p["clf_batch"], seed=a.seed)
    tok_dir = D.train_tokenizer(out, data_path, p, a.seed)
    codes_dir = D.cache_codes(out, tok_dir, data_path, p)
    from runtime.fingerprint import tokenizer_sha256
    from tokenizer import MGVQTokenizer

    tok = MGVQTokenizer.from_pretrained(str(tok_dir)).eval()
    meta = json.loads((codes_dir / "meta.json").read_text())
    G, K, grid, ncls = meta["groups"], meta["codebook_size"], meta["grid"][0], meta["num_classes"]

    per_class = p["eval_per_class"]
    labels = [c for c in range(len(names)) for _ in range(per_class)]
    _, real_feats = predict(clf, x_test)
    _, train_feats = predict(clf, x_train[:len(labels)])
    with torch.no_grad():
        recon = torch.cat([(tok.decode(tok.encode(D.to_model(x_test[i:i + 500]))) + 1).div(2).clamp(0, 1)
                           for i in range(0, len(labels), 500)])[:len(labels)]
    _, recon_feats = predict(clf, recon)
    floors = {"real_vs_real": classifier_fd(real_feats, train_feats),
              "recon_vs_real": classifier_fd(real_feats, recon_feats)}

    rows = []
    for name in a.variants:
        margs = variant_args(name, base, G, K, grid, ncls)
        tag = f"{name}-d{margs['dim']}-l{margs['n_layer']}" + (f"-ar{margs['ar_head_layers']}" if name != "parallel"
                                                              else "") + f"-s{p['gen_steps']}-b{p['gen_batch']}-lr{p['gen_lr']}"
        gen_dir, train_s = train_variant(out / "gen" / tag, codes_dir, tok_dir, margs, p, a.seed)
        gpt = GPT.from_pretrained(str(gen_dir)).eval()
        pipe = MGVQPipeline(tok, gpt, id2label=names, tokenizer_sha256=tokenizer_sha256(str(tok_dir)))
        summary = json.loads((gen_dir / "train_summary.json").read_text())
        for s, k, t in itertools.product(cfgs, a.top_k, a.temperature):
            kw = {"top_k": k or None, "temperature": t}
            cfg_res = score(pipe, clf, labels, real_feats, s, a.seed, **kw)
            nocfg = score(pipe, clf, labels, real_feats, 1.0, a.seed, **kw)
            rows.append({"variant": name, "tag": tag, "params": gpt.num_parameters(), "n_layer": margs["n_layer"],
                         "ar_head_layers": margs.get("ar_head_layers") if name != "parallel" else None,
                         "steps": p["gen_steps"], "batch": p["gen_batch"], "lr": p["gen_lr"],
                         "train_s": round(train_s, 1), "eval_loss": summary.get("final_eval_loss"),
                         "cfg": s, "top_k": k, "temperature": t,
                         "acc_cfg": cfg_res["cond_accuracy"], "acc_no_cfg": nocfg["cond_accuracy"],
                         "fd_cfg": cfg_res["classifier_fd"], "fd_no_cfg": nocfg["classifier_fd"],
                         "img_per_s_cfg": cfg_res["images_per_s"], "img_per_s_no_cfg": nocfg["images_per_s"]})
            print(json.dumps(rows[-1]), flush=True)

    (out / "heads.json").write_text(json.dumps({"floors": floors, "rows": rows, "profile": p,
                                                "threads": a.threads, "num_samples": len(labels)}, indent=2))
    print(f"\n{len(labels)} samples ({per_class} per class), seed {a.seed}, {a.threads} thread(s); classifier FD "
          f"floors: real train vs real test {floors['real_vs_real']:.2f}, tokenizer reconstructions vs real "
          f"{floors['recon_vs_real']:.2f}")
    head = (f"{'variant':<13} {'params':>8} {'layers':>7} {'steps':>6} {'batch':>5} {'train s':>8} {'eval CE':>7} "
            f"{'cfg':>4} {'top-k':>5} {'T':>4} {'acc CFG':>8} {'acc 1.0':>8} {'FD CFG':>7} {'FD 1.0':>7} "
            f"{'img/s CFG':>9} {'img/s 1.0':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        layers = f"{r['n_layer']}" + (f"+{r['ar_head_layers']}" if r["ar_head_layers"] else "")
        print(f"{r['variant']:<13} {r['params'] / 1e6:>7.2f}M {layers:>7} {r['steps']:>6} {r['batch']:>5} "
              f"{r['train_s']:>8.0f} {r['eval_loss']:>7.3f} {r['cfg']:>4g} {r['top_k']:>5} {r['temperature']:>4g} "
              f"{r['acc_cfg']:>8.3f} {r['acc_no_cfg']:>8.3f} {r['fd_cfg']:>7.2f} {r['fd_no_cfg']:>7.2f} "
              f"{r['img_per_s_cfg']:>9.1f} {r['img_per_s_no_cfg']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
