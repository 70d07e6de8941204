"""MGVQ against LlamaGen, end to end, on models this project trains: the comparison users come for, at CPU scale.

On the demo's Fashion-MNIST (32 px, all 60k training images), every row gets the same data, tokenizer backbone and
steps, the same total number of codes, the same GPT backbone (dim, layers, heads), steps, batch and lr, the same seeds
and the same evaluation (`mgvq compare` with the demo's classifier as the feature net):

  llamagen       LlamaGen's layout: one codebook (G=1, C=8, l2-normalised codes, K = 1024 = the MGVQ rows' total
                 codes) + a GPT with one embedding table and one head
  mgvq-parallel  MGVQ G=4 (4 x 256, C=32: the demo's tokenizer) + summed per-group embeddings + 4 parallel heads
                 (the demo's generator)
  mgvq-ar        the same G=4 tokenizer + MGVQ's projector input (its frozen code vectors -> MLP) + AR head
  mgvq-g8-ar     G=8 (8 x 128, C=32) + projector + AR head

Per row and seed: tokenizer PSNR and classifier FD of reconstructions on the test split; per guidance scale: classifier
FD to the real test split, conditional accuracy, k-NN precision / recall on the classifier's features, the classifier
score (IS formula on its class probabilities) and sampling images/s (generation + decode). Sampling is plain
(temperature 1, no top-k / top-p) unless --temperature / --top-k say otherwise, so no row gets tuned truncation.

    python bench/llamagen_vs_mgvq.py --out runs/llamagen_vs_mgvq --jobs 2        # the run docs/results.md reports
    python bench/llamagen_vs_mgvq.py --quick --out /tmp/lvm                       # same code path, < 10 min
    python bench/llamagen_vs_mgvq.py --out runs/lvm --rows llamagen mgvq-parallel --seeds 0
    python bench/llamagen_vs_mgvq.py --out runs/lvm_4800 --rows llamagen mgvq-parallel --gen-steps 4800 \
        --tokenizers-from runs/llamagen_vs_mgvq --jobs 2      # parallel rows at ~ the AR rows' training time

Writes <out>/results.json ({row: {..., "sweep": [{guidance_scale, fd, accuracy, precision, recall, images_per_s,
classifier_score, per_seed}, ...]}, "meta": {...}}), <out>/results.md (the tables) and <out>/fd_vs_accuracy.png (FD
against accuracy over the guidance sweep, one curve per row; precision against recall beside it). Every stage is
reused on a rerun with the same settings (pipelines.demo's stage markers), so an interrupted run continues.
--jobs N runs the seeds in N processes (torch threads split between them).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import demo as D  # noqa: E402

TOTAL_CODES = 1024  # codes per position summed over the sub-codebooks: equal in every row
NUM_CLASSES = 10  # Fashion-MNIST


@dataclass(frozen=True)
class TokenizerSpec:
    groups: int
    latent_dim: int
    nested: bool  # MGVQ's nested masking of the trailing groups (released recipe); meaningless for G = 1

    @property
    def codebook_size(self) -> int:  # K per sub-codebook
        return TOTAL_CODES // self.groups

    def overrides(self) -> dict:
        """TokenizerConfig fields on top of the demo's backbone (mgvq-tiny + the demo profile's tok_overrides):
        l2-normalised codes, beta, dead-code re-init and the backbone are shared by all rows."""
        return {"groups": self.groups, "latent_dim": self.latent_dim, "codebook_size": self.codebook_size,
                "nested_keep_probs": "default" if self.nested else None}


TOKENIZERS = {
    "g1-c8": TokenizerSpec(groups=1, latent_dim=8, nested=False),  # LlamaGen VQ: one codebook of dim 8
    "g4-c32": TokenizerSpec(groups=4, latent_dim=32, nested=True),  # the demo's MGVQ tokenizer
    "g8-c32": TokenizerSpec(groups=8, latent_dim=32, nested=True),
}


@dataclass(frozen=True)
class RowSpec:
    tokenizer: str  # a TOKENIZERS key
    input_mode: str  # GPTConfig.input_mode: "sum" | "projector"
    head: str  # GPTConfig.head: "parallel" | "ar"


ROWS = {
    "llamagen": RowSpec("g1-c8", "sum", "parallel"),
    "mgvq-parallel": RowSpec("g4-c32", "sum", "parallel"),
    "mgvq-ar": RowSpec("g4-c32", "projector", "ar"),
    "mgvq-g8-ar": RowSpec("g8-c32", "projector", "ar"),
}

PROFILES = {
    # the demo's default stages (tokenizer 1500 steps, GPT dim 128 x 3 layers, batch 32, lr 2e-3) with the generator
    # at 1200 steps on 20k cached images: MGVQ's AR head (2 layers, like the released code) runs over the G sub-tokens
    # of every position, so its rows cost 4x (G=4) and 7x (G=8) the parallel rows' time per step on a CPU; 4500 steps
    # (the demo's) of all four rows and two seeds would take ~6 CPU-hours
    "default": dict(D.PROFILES["default"], gen_steps=1200, cache_limit=20000, seeds=[0, 1],
                    guidance=[1.0, 1.5, 2.0, 3.0, 4.0], per_class=200, sample_batch=250),
    # the same code path in a few minutes: the demo's quick stages, few samples
    "quick": dict(D.PROFILES["quick"], tok_steps=30, gen_steps=40, cache_limit=1000, tok_eval=200, seeds=[0, 1],
                  guidance=[1.0, 1.5, 2.0, 3.0, 4.0], per_class=10, sample_batch=100),
}


def gen_args(row: RowSpec, base: dict) -> dict:
    """GPTConfig overrides of a row: the profile's backbone (dim, n_layer, n_head) + the row's input and head."""
    return {**base, "input_mode": row.input_mode, "head": row.head}


def _log(msg: str) -> None:
    print(f"[llamagen_vs_mgvq {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- shared stages: data, classifier, reference ------------------------------------------------------------------
def prepare(out: Path, p: dict, data_dir: str | None):
    """Data, the shared classifier (seed 0: the yardstick is the same for every row and seed) and the reference npz
    (the real test split, uint8 NHWC) the feature net compares samples with."""
    from evaluation.metrics import save_npz
    from pipelines.classifier import load_or_train

    data_path = D.find_data(data_dir)
    x_train, y_train, names = D.load_split(data_path, "train", p["num_train"])
    x_test, y_test, _ = D.load_split(data_path, "test", p["num_test"])
    clf, info = load_or_train(str(out / "classifier"), x_train, y_train, x_test, y_test, steps=p["clf_steps"],
                              batch_size=p["clf_batch"], seed=0, progress=False)
    ref = out / "ref_test.npz"
    if not ref.is_file():
        save_npz(ref, np.repeat(x_test[..., None], 3, axis=-1), labels=y_test)
    return data_path, (x_train, y_train, x_test, y_test, names), clf, info, ref


# ---- one seed: tokenizers, codes, generators, pipelines, the guidance sweep through `mgvq compare` -------------------
def run_seed(out: Path, p: dict, seed: int, rows: list[str], data_dir: str | None,
             tokenizers_from: str | None = None) -> dict:
    """Everything for one seed -> <out>/seed<seed>/seed_results.json (and returned)."""
    data_path, (_, _, x_test, _, names), clf, _, ref = prepare(out, p, data_dir)
    sdir = out / f"seed{seed}"
    res = {"seed": seed, "tokenizers": {}, "rows": {}}
    toks = train_tokenizers(sdir, p, seed, rows, data_path, x_test, clf, res, tokenizers_from)
    pipes = train_generators(sdir, p, seed, rows, names, toks, res)
    guidance_sweep(out, sdir, p, seed, pipes, ref, res)
    (sdir / "seed_results.json").write_text(json.dumps(res, indent=2))
    return res


def train_tokenizers(sdir: Path, p: dict, seed: int, rows: list[str], data_path: Path, x_test, clf, res: dict,
                     tokenizers_from: str | None) -> dict:
    """Each tokenizer the rows need, once: train (or reuse), cache the codes, score PSNR and the reconstructions'
    classifier FD on the test split -> res["tokenizers"]; returns {name: (tokenizer, folder, codes folder)}."""
    from pipelines.classifier import classifier_fd, predict
    from tokenizer import MGVQTokenizer

    _, real_feats = predict(clf, x_test)
    toks = {}
    for tname in dict.fromkeys(ROWS[r].tokenizer for r in rows):  # in row order
        spec = TOKENIZERS[tname]
        tp = dict(p, tok_overrides={**p["tok_overrides"], **spec.overrides()})
        tfolder = (Path(tokenizers_from) / f"seed{seed}" if tokenizers_from else sdir) / tname
        _log(f"seed {seed}: tokenizer {tname} (G={spec.groups}, K={spec.codebook_size}, C={spec.latent_dim})")
        tok_dir = D.train_tokenizer(tfolder, data_path, tp, seed, reuse_only=bool(tokenizers_from))
        codes_dir = D.cache_codes(tfolder, tok_dir, data_path, tp, reuse_only=bool(tokenizers_from))
        tok = MGVQTokenizer.from_pretrained(str(tok_dir)).eval()
        m, recons = D.evaluate_tokenizer(tok, x_test[:p["tok_eval"]])
        _, recon_feats = predict(clf, recons[spec.groups])
        toks[tname] = (tok, tok_dir, codes_dir)
        t = res["tokenizers"][tname] = {
            "psnr": m["psnr"], "psnr_of_mean_mse": m["psnr_of_mean_mse"], "ssim": m["ssim"],
            "recon_fd": classifier_fd(real_feats, recon_feats), "codebook_usage": m["codebook_usage"],
            "psnr_by_groups_to_use": m["psnr_by_groups_to_use"], "params": tok.num_parameters(),
            "train_seconds": D.stage_seconds(tfolder / "tokenizer"), "cache_seconds": D.stage_seconds(codes_dir),
            **asdict(spec), "codebook_size": spec.codebook_size}
        _log(f"seed {seed}: tokenizer {tname}: PSNR {t['psnr']:.2f} dB, recon FD {t['recon_fd']:.2f}")
    return toks


def train_generators(sdir: Path, p: dict, seed: int, rows: list[str], names: list[str], toks: dict,
                     res: dict) -> dict[str, str]:
    """Each row's GPT on its tokenizer's codes (same backbone, steps, batch, lr) and its pipeline folder ->
    res["rows"]; returns {row: pipeline folder}."""
    from generator import GPT
    from pipelines import MGVQPipeline
    from runtime.fingerprint import tokenizer_sha256

    pipes = {}
    for r in rows:
        spec = ROWS[r]
        tok, tok_dir, codes_dir = toks[spec.tokenizer]
        rfolder = sdir / r
        _log(f"seed {seed}: generator {r} ({spec.input_mode} input, {spec.head} head)")
        gen_dir = D.train_generator(rfolder, codes_dir, tok, dict(p, gen_args=gen_args(spec, p["gen_args"])), seed,
                                    codebook=str(tok_dir) if spec.input_mode == "projector" else None)
        gpt = GPT.from_pretrained(str(gen_dir))
        pipe = MGVQPipeline(tok, gpt, id2label=names, tokenizer_sha256=tokenizer_sha256(str(tok_dir)))
        pipe.save_pretrained(str(rfolder / "pipeline"))
        pipes[r] = str(rfolder / "pipeline")
        summary = json.loads((gen_dir / "train_summary.json").read_text())
        res["rows"][r] = {"params": gpt.num_parameters(), "train_seconds": D.stage_seconds(rfolder / "generator"),
                          "final_eval_loss": summary.get("final_eval_loss"), "tokenizer": spec.tokenizer,
                          "sweep": {}}
    return pipes


def guidance_sweep(out: Path, sdir: Path, p: dict, seed: int, pipes: dict[str, str], ref: Path, res: dict) -> None:
    """`mgvq compare` of all rows at each guidance scale (same labels, seeds, sampler settings, classifier feature
    net and reference) -> res["rows"][row]["sweep"][scale]."""
    from pipelines.compare import compare

    n = p["per_class"] * NUM_CLASSES
    sampling = {"temperature": p.get("sweep_temperature", 1.0), "top_k": p.get("sweep_top_k")}
    for s in p["guidance"]:
        _log(f"seed {seed}: mgvq compare, guidance {s}, {n} samples per row")
        table = compare(pipelines=pipes, out=str(sdir / "eval" / f"cfg{s:g}"), num_images=n,
                        batch_size=p["sample_batch"], guidance_scale=s, seed=seed * 1_000_000, ref=str(ref),
                        feature_net=str(out / "classifier"), eval_batch_size=500,
                        **{k: v for k, v in sampling.items() if v is not None})
        for r, m in table["results"].items():
            res["rows"][r]["sweep"][f"{s:g}"] = m


def real_floors(out: Path, p: dict, x_train, y_train, ref: Path) -> dict:
    """What real images score with the same evaluator and sample size: the first N training images (N = samples per
    row) against the test reference: FD, accuracy, classifier score, precision / recall (the targets a sampler can
    reach at best)."""
    from evaluation.sample import evaluate_samples
    from pipelines.classifier import ClassifierFeatures

    n = p["per_class"] * NUM_CLASSES
    images = np.repeat(x_train[:n, ..., None], 3, axis=-1)
    m = evaluate_samples(images, ref, ClassifierFeatures.from_folder(str(out / "classifier")), cache_dir=out,
                         batch_size=500, labels=y_train[:n])
    return {k: m[k] for k in ("fd", "accuracy", "classifier_score", "precision", "recall", "num_images")}


# ---- aggregation over seeds ------------------------------------------------------------------------------------------
SWEEP_KEYS = ("fd", "accuracy", "precision", "recall", "classifier_score", "images_per_s")


def _mean(values):
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _spread(values):  # half the range over seeds: with two seeds, mean +- spread are the two values
    v = [x for x in values if x is not None]
    return float((max(v) - min(v)) / 2) if len(v) > 1 else None


def aggregate(per_seed: list[dict], rows: list[str], p: dict, meta: dict) -> dict:
    out = {}
    for r in rows:
        spec = ROWS[r]
        runs = [s["rows"][r] for s in per_seed]
        toks = [s["tokenizers"][spec.tokenizer] for s in per_seed]
        sweep = []
        for g in p["guidance"]:
            cells = {s["seed"]: s["rows"][r]["sweep"][f"{g:g}"] for s in per_seed}
            entry = {"guidance_scale": g}
            for k in SWEEP_KEYS:
                entry[k] = _mean(c.get(k) for c in cells.values())
                entry[f"{k}_spread"] = _spread(c.get(k) for c in cells.values())
            entry["per_seed"] = {str(sd): {k: c.get(k) for k in SWEEP_KEYS} for sd, c in cells.items()}
            sweep.append(entry)
        t = TOKENIZERS[spec.tokenizer]
        out[r] = {
            **asdict(spec), "groups": t.groups, "codebook_size": t.codebook_size, "latent_dim": t.latent_dim,
            "total_codes": t.groups * t.codebook_size, "gpt_backbone": {k: p["gen_args"][k] for k in
                                                                        ("dim", "n_layer", "n_head")},
            "params": runs[0]["params"], "tokenizer_params": toks[0]["params"],
            "train_seconds": _mean(x["train_seconds"] for x in runs),
            "tokenizer_train_seconds": _mean(x["train_seconds"] for x in toks),
            "final_eval_loss": _mean(x["final_eval_loss"] for x in runs),
            "tokenizer_psnr": _mean(x["psnr"] for x in toks), "tokenizer_psnr_spread": _spread(x["psnr"] for x in toks),
            "tokenizer_recon_fd": _mean(x["recon_fd"] for x in toks),
            "tokenizer_codebook_usage": _mean(float(np.mean(x["codebook_usage"])) for x in toks),
            "sweep": sweep,
        }
    out["meta"] = {**meta, "seeds": [s["seed"] for s in per_seed]}
    return out


def _f(v, fmt=".2f"):
    return "-" if v is None else format(v, fmt)


def markdown(res: dict, rows: list[str], p: dict) -> str:
    meta = res["meta"]
    real = meta["real_images"]
    lines = [f"# LlamaGen vs MGVQ layouts on Fashion-MNIST 32 px ({meta['profile']} profile, seeds "
             f"{meta['seeds']})", "",
             f"Command: `{meta['command']}`; {meta['samples_per_row']} class-balanced samples per row, seed and "
             f"guidance scale; sampling temperature {meta['temperature']}, top-k {meta['top_k']}; wall time "
             f"{meta['wall_seconds']:.0f} s. Values are means over seeds, +- half their range. Real training "
             f"images scored the same way (the ceiling): FD {real['fd']:.2f}, accuracy {real['accuracy']:.3f}, "
             f"precision {real['precision']:.3f}, recall {real['recall']:.3f}, classifier score "
             f"{real['classifier_score']:.2f}.", "",
             "| row | tokenizer | GPT input / head | GPT params | GPT train s | eval CE | tok. PSNR | tok. recon FD |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = res[r]
        lines.append(f"| {r} | G={x['groups']} x K={x['codebook_size']}, C={x['latent_dim']} | {x['input_mode']} / "
                     f"{x['head']} | {x['params'] / 1e6:.2f}M | {_f(x['train_seconds'], '.0f')} | "
                     f"{_f(x['final_eval_loss'], '.3f')} | {_f(x['tokenizer_psnr'])} +- "
                     f"{_f(x['tokenizer_psnr_spread'])} | {_f(x['tokenizer_recon_fd'])} |")
    lines += ["", "| row | CFG | FD | accuracy | precision | recall | classifier score | images/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for e in res[r]["sweep"]:
            lines.append(f"| {r} | {e['guidance_scale']:g} | {_f(e['fd'])} +- {_f(e['fd_spread'])} | "
                         f"{_f(e['accuracy'], '.3f')} +- {_f(e['accuracy_spread'], '.3f')} | "
                         f"{_f(e['precision'], '.3f')} | {_f(e['recall'], '.3f')} | {_f(e['classifier_score'])} | "
                         f"{_f(e['images_per_s'], '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, rows: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.6))
    for r in rows:
        sw = res[r]["sweep"]
        acc, fd = [e["accuracy"] for e in sw], [e["fd"] for e in sw]
        ax[0].errorbar(acc, fd, xerr=[e["accuracy_spread"] or 0 for e in sw], yerr=[e["fd_spread"] or 0 for e in sw],
                       marker="o", capsize=2, label=r)
        for e in sw:
            ax[0].annotate(f"{e['guidance_scale']:g}", (e["accuracy"], e["fd"]), fontsize=7,
                           textcoords="offset points", xytext=(3, 3))
        ax[1].plot([e["recall"] for e in sw], [e["precision"] for e in sw], marker="o", label=r)
    real = res["meta"]["real_images"]
    ax[0].plot([real["accuracy"]], [real["fd"]], marker="*", ms=12, color="k", ls="none", label="real train images")
    ax[1].plot([real["recall"]], [real["precision"]], marker="*", ms=12, color="k", ls="none", label="real train images")
    ax[0].set(xlabel="conditional accuracy (demo classifier)", ylabel="classifier FD to real test (lower is better)",
              title="FD vs accuracy over the guidance sweep (labels: CFG scale)", ylim=(0, None))
    ax[1].set(xlabel="recall", ylabel="precision", title="precision vs recall (k=3, classifier features)")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/llamagen_vs_mgvq")
    ap.add_argument("--quick", action="store_true", help="the same code path in a few minutes (few steps / samples)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the profile's, 0 1)")
    ap.add_argument("--guidance", type=float, nargs="+", help="CFG scales (default: 1 1.5 2 3 4)")
    ap.add_argument("--per-class", type=int, help="samples per class per row, seed and scale (default 200 / quick 10)")
    ap.add_argument("--tok-steps", type=int, help="tokenizer steps (default: the demo profile's)")
    ap.add_argument("--gen-steps", type=int, help="generator steps (default: the demo profile's)")
    ap.add_argument("--cache-limit", type=int, help="training images cached for the generators (default: all)")
    ap.add_argument("--num-train", type=int, help="training images for classifier / tokenizers (default: all)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for every row (default 1)")
    ap.add_argument("--top-k", type=int, default=0, help="top-k for every row's sub-codebooks (default 0: off)")
    ap.add_argument("--tokenizers-from", metavar="DIR",
                    help="reuse the tokenizers and code caches of an earlier run's --out (same profile / tokenizer "
                         "settings; refused otherwise), e.g. to train the generators longer into a new --out")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, help="torch threads per process (default: cores / jobs)")
    ap.add_argument("--jobs", type=int, default=1, help="run the seeds in this many processes")
    ap.add_argument("--report-only", action="store_true",
                    help="train and sample nothing: the tables and the plot from the seeds' seed_results.json in --out")
    ap.add_argument("--seed-only", action="store_true", help=argparse.SUPPRESS)  # a --jobs worker: one seed, no report
    return ap


def profile(a: argparse.Namespace) -> dict:
    p = dict(PROFILES["quick" if a.quick else "default"])
    for key, v in (("seeds", a.seeds), ("guidance", a.guidance), ("per_class", a.per_class), ("tok_steps", a.tok_steps),
                   ("gen_steps", a.gen_steps), ("cache_limit", a.cache_limit), ("num_train", a.num_train)):
        if v is not None:
            p[key] = v
    for flag, v in (("--per-class", p["per_class"]), ("--tok-steps", p["tok_steps"]), ("--gen-steps", p["gen_steps"]),
                    ("--jobs", a.jobs)):
        if v < 1:
            raise SystemExit(f"{flag}={v}: must be >= 1")
    if any(not 0 <= g < float("inf") for g in p["guidance"]) or len(set(p["guidance"])) != len(p["guidance"]):
        raise SystemExit(f"--guidance {p['guidance']}: distinct finite scales >= 0")
    if a.top_k < 0 or not 0 < a.temperature < float("inf"):
        raise SystemExit(f"--top-k {a.top_k} / --temperature {a.temperature}: need top-k >= 0 and temperature > 0")
    p["sweep_temperature"], p["sweep_top_k"] = a.temperature, (a.top_k or None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    p = profile(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in ROWS if r in a.rows]
    jobs = min(a.jobs, len(p["seeds"]))
    torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // jobs))
    if a.seed_only:
        run_seed(out, p, p["seeds"][0], rows, a.data_dir, a.tokenizers_from)
        return 0
    missing = [s for s in p["seeds"] if not (out / f"seed{s}" / "seed_results.json").is_file()]
    if a.report_only and missing:
        raise SystemExit(f"--report-only: no seed_results.json for seed(s) {missing} in {out}")
    t0 = time.time()
    # once, before any worker starts (the classifier and the reference are shared)
    _, (x_train, y_train, *_), _, _, ref = prepare(out, p, a.data_dir)
    if a.report_only:
        per_seed = [json.loads((out / f"seed{s}" / "seed_results.json").read_text()) for s in p["seeds"]]
    elif jobs > 1:
        procs = []
        for seed in p["seeds"]:  # at most `jobs` at a time
            cmd = [sys.executable, __file__, *strip_flags(argv, ("--jobs", "--seeds", "--threads")),
                   "--seeds", str(seed), "--threads", str(torch.get_num_threads()), "--seed-only"]
            log = open(out / f"seed{seed}.log", "w")
            procs.append((seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
            _log(f"seed {seed}: worker started (log {out / f'seed{seed}.log'})")
            while sum(pr.poll() is None for _, pr, _ in procs) >= jobs:
                time.sleep(5)
        for seed, pr, log in procs:
            if pr.wait() != 0:
                raise SystemExit(f"seed {seed} failed (exit {pr.returncode}); see {out / f'seed{seed}.log'}")
            log.close()
        per_seed = [json.loads((out / f"seed{s}" / "seed_results.json").read_text()) for s in p["seeds"]]
    else:
        per_seed = [run_seed(out, p, s, rows, a.data_dir, a.tokenizers_from) for s in p["seeds"]]
    meta = {"profile": "quick" if a.quick else "default", "command": "python bench/llamagen_vs_mgvq.py "
            + " ".join(argv), "samples_per_row": p["per_class"] * NUM_CLASSES, "temperature": p["sweep_temperature"],
            "top_k": p["sweep_top_k"], "guidance": p["guidance"], "wall_seconds": time.time() - t0,
            "threads": torch.get_num_threads(), "jobs": jobs, "tok_steps": p["tok_steps"], "gen_steps": p["gen_steps"],
            "gen_batch": p["gen_batch"], "gen_args": p["gen_args"], "cache_limit": p["cache_limit"],
            "real_images": real_floors(out, p, x_train, y_train, ref)}
    old = out / "results.json"
    if a.report_only and old.is_file():  # the run that made the seeds' results: its command and wall time
        meta.update({k: json.loads(old.read_text())["meta"][k] for k in ("command", "wall_seconds", "jobs")})
    res = aggregate(per_seed, rows, p, meta)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    md = markdown(res, rows, p)
    (out / "results.md").write_text(md)
    plot(res, rows, out / "fd_vs_accuracy.png")
    print(md)
    _log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'fd_vs_accuracy.png'}")
    return 0


def strip_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given flags and their values (a flag's values run until the next --flag)."""
    kept, skipping = [], False
    for x in argv:
        if x.startswith("--"):
            skipping = x.split("=")[0] in flags
            if skipping:
                continue
        if not skipping:
            kept.append(x)
    return kept


if __name__ == "__main__":
    sys.exit(main())
