"""generator.train on the CPU: single process vs DeepSpeed ZeRO-2 / ZeRO-3 (2 processes, gloo), checkpoint resume,
SIGKILL resume, non-finite-loss skip, export. Real subprocesses and launchers (accelerate launch, torchrun)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from generator import GPT
from generator.train import EpochIndexed, StepBatches, SyntheticCodes, load_config, main
from runtime.optim import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR")
           or os.path.join(os.path.expanduser("~"), ".cache", "mgvq", "torch_extensions"))
NO_DROPOUT = ["model_overrides.token_dropout_p=0", "model_overrides.resid_dropout_p=0",
              "model_overrides.ffn_dropout_p=0", "model_overrides.class_dropout_prob=0"]
# global batch 16 = 1 process x 8 x accum 2 = 2 processes x 8 x accum 1; NaN injected into rank 0's loss at step 3
# by tests/_inject_nan.py (monkeypatching; the run is launched through that script)
NAN_AT_3 = ["tests/_inject_nan.py", "3"]
COMMON = ["--config", "configs/generator/tiny.yaml", "global_batch_size=16", "batch_size=8", "log_every=1",
          "sample_every=0", "num_workers=0", "precision=fp32", "save_every=1", "keep_checkpoints=5", *NO_DROPOUT]
G, K, GRID, NCLS = 2, 64, 8, 10


def run(cmd, timeout=600):
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed (rc={r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout + r.stderr


def train_cmd(*args):
    return [sys.executable, "-m", "generator.train", *args]


def nan_train_cmd(*args):
    return [sys.executable, *NAN_AT_3, *args]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def summary(out):
    with open(os.path.join(out, "final", "train_summary.json")) as f:
        return json.load(f)


def eval_batch(shard_dir, n):
    from generator.data import CodeShardDataset

    items = EpochIndexed(CodeShardDataset(shard_dir, seed=0)).__getitems__([(0, i) for i in range(n)])
    return torch.stack([c for c, _ in items]), torch.stack([lb for _, lb in items])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 images x 2 views in the cache_codes layout; codes from learnable class templates."""
    out = str(tmp_path_factory.mktemp("shards"))
    os.makedirs(os.path.join(out, "data"))
    n, V = 64, 2
    codes = torch.stack([SyntheticCodes(n, GRID, G, K, NCLS, seed=s).codes for s in (1, 2)], 1).numpy()  # (n,V,..)
    labels = SyntheticCodes(n, GRID, G, K, NCLS, seed=1).labels.numpy()
    names = [f"class_{i}" for i in range(NCLS)]
    feats = datasets.Features({"codes": datasets.Array4D(shape=(V, GRID, GRID, G), dtype="int16"),
                               "label": datasets.ClassLabel(names=names), "index": datasets.Value("int64")})
    shard_names = []
    for k in range(2):
        idx = np.arange(k * 32, (k + 1) * 32)
        ds = datasets.Dataset.from_dict({"codes": codes[idx], "label": labels[idx], "index": idx}, features=feats)
        shard_names.append(f"data/codes-{k:05d}-of-00002.parquet")
        pq.write_table(ds.data.table, os.path.join(out, shard_names[-1]))
    meta = {"format": "mgvq-codes", "version": 1, "groups": G, "codebook_size": K, "grid": [GRID, GRID],
            "dtype": "int16", "views": {"mode": "test", "count": V, "names": ["a", "b"]}, "class_names": names,
            "num_classes": NCLS, "shards": shard_names, "counts": {"images": n, "written": n, "skipped": 0},
            "complete": True}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    return out


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """Single process, accumulation 2, 4 steps, NaN at step 3."""
    out = str(tmp_path_factory.mktemp("ref"))
    run(nan_train_cmd(*COMMON, f"data={shards}", f"out_dir={out}", "steps=4", "sample_every=2"))
    return out


# ------------------------------------------------------------------------------------------------- pure functions


def test_config_overlay_and_errors(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs/generator/gpt-xxl.yaml"), ["lr=3e-4", "model_overrides.dim=512",
                                                                             "steps=10", "sample_classes=[1,2]"])
    assert cfg.model == "GPT-XXL" and cfg.lr == 3e-4 and cfg.global_batch_size == 512 and cfg.steps == 10
    assert cfg.model_overrides["dim"] == 512 and cfg.sample_classes == [1, 2]
    assert (cfg.betas, cfg.weight_decay, cfg.grad_clip) == ((0.9, 0.95), 0.05, 1.0)
    # the old vocabulary still loads (existing YAML / run folders), with a deprecation message
    with pytest.warns(FutureWarning, match="`model_args` is deprecated, use `model_overrides`"):
        old = load_config(None, ["model_args.dim=64", "out=o", "ckpt_every=7", "keep_last=4", "max_steps=3",
                                 "beta1=0.8", "beta2=0.9", "tensorboard=false", "max_nonfinite_in_row=2"])
    assert (old.model_overrides, old.out_dir, old.save_every, old.keep_checkpoints, old.steps, old.betas,
            old.log_with, old.max_nonfinite) == ({"dim": 64}, "o", 7, 4, 3, (0.8, 0.9), "none", 2)
    with pytest.raises(ValueError, match="inject_nan_at was removed"):
        load_config(None, ["inject_nan_at=[3]"])
    with pytest.raises(ValueError, match="did you mean lr"):
        load_config(None, ["lrr=1"])
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        load_config(None, ["model_overrides.nope=1"])
    with pytest.raises(ValueError, match="multiple of batch_size"):
        load_config(None, ["global_batch_size=10", "batch_size=4"])
    for name in ("gpt-b", "gpt-l", "gpt-xl", "gpt-xxl", "tiny"):
        load_config(os.path.join(ROOT, f"configs/generator/{name}.yaml"))
    assert load_config(os.path.join(ROOT, "configs/generator/gpt-xl.yaml")).lr == 2e-4


def test_help_shows_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "python -m generator.train --config configs/generator/tiny.yaml" in text and "--peak-tflops" in text


def test_data_order_partition_and_lr():
    # global batch 16 = 2 ranks x 4 x accum 2 = 1 rank x 8 x accum 2: every global step is the same block of items
    n, steps = 40, 5
    per_rank = [list(StepBatches(n, 16, 4, 2, r, 7, 0, steps)) for r in range(2)]
    single = list(StepBatches(n, 16, 8, 1, 0, 7, 0, steps))
    step_items = lambda mbs, s: sorted(i for b in mbs[2 * s:2 * s + 2] for _, i in b)  # noqa: E731
    for s in range(steps):
        assert step_items(per_rank[0], s) + step_items(per_rank[1], s) != []
        assert sorted(step_items(per_rank[0], s) + step_items(per_rank[1], s)) == step_items(single, s)
        assert not set(step_items(per_rank[0], s)) & set(step_items(per_rank[1], s))
    epoch0 = [i for s in range(2) for i in step_items(single, s)]
    assert len(set(epoch0)) == 32 and {e for b in single[4:6] for e, _ in b} == {1}  # 2 steps/epoch, drop-last
    assert list(StepBatches(n, 16, 8, 1, 0, 7, 3, steps)) == single[6:]  # resuming at step 3
    lr = lambda step: lr_at(step, 110, 1e-3, "cosine", warmup_steps=10, min_lr=1e-4)  # noqa: E731
    assert lr(0) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(0.5 * (1e-3 + 1e-4)) and lr(110) == pytest.approx(1e-4)
    gpt = GPT.from_preset("GPT-tiny", groups=G, codebook_size=K, grid=GRID, num_classes=NCLS)
    decay, no_decay = gpt.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(gpt.parameters()))


# ---------------------------------------------------------------------------------------------- training runs


def test_single_process_skips_nonfinite_and_exports(reference, shards):
    m = metrics(reference)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert m[2]["loss"] is None and m[2]["skipped_steps"] == 1 and m[3]["skipped_steps"] == 1
    assert all(r["loss"] is not None and 2.0 < r["loss"] < 4.2 for r in (m[0], m[1], m[3]))
    assert m[3]["loss"] < m[0]["loss"]  # it learns (ln 64 = 4.159 at the zero-init head)
    assert m[0]["loss"] == pytest.approx(np.log(K), abs=1e-4)
    ck = os.path.join(reference, "checkpoints")
    w = {s: load_file(os.path.join(ck, f"step_{s:08d}", "model.safetensors")) for s in (2, 3, 4)}
    assert all(torch.equal(w[2][k], w[3][k]) for k in w[2])  # the NaN step never reached the weights
    assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3])  # and training continued
    assert sorted(os.listdir(ck)) == [f"step_{s:08d}" for s in range(1, 5)]
    assert os.path.isfile(os.path.join(reference, "samples", "step_00000002.png"))
    assert os.path.isfile(os.path.join(reference, "samples", "step_00000004.safetensors"))
    s = summary(reference)
    model = GPT.from_pretrained(os.path.join(reference, "final")).eval()
    codes, labels = eval_batch(shards, s["eval_items"])
    with torch.no_grad():
        loss = float(model.compute_loss(codes, labels)["loss"])
    assert loss == pytest.approx(s["final_eval_loss"], abs=1e-6) == s["export_eval_loss"]
    assert json.load(open(os.path.join(reference, "final", "id2label.json")))["3"] == "class_3"


def _compare_to_reference(out, reference):
    ref, got = metrics(reference), metrics(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        if a["loss"] is None:
            assert b["loss"] is None and b["skipped_steps"] == 1
            continue
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["group_losses"] == pytest.approx(a["group_losses"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    w_ref = load_file(os.path.join(reference, "final", "model.safetensors"))
    w = load_file(os.path.join(out, "final", "model.safetensors"))
    assert w.keys() == w_ref.keys()
    for k in w:
        torch.testing.assert_close(w[k], w_ref[k], rtol=1e-4, atol=1e-5)


def test_zero2_accelerate_launch_matches_single_process_and_resumes(reference, shards, tmp_path):
    out = str(tmp_path / "z2")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/zero2.yaml",
              "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29611",
              *NAN_AT_3, *COMMON, f"data={shards}", f"out_dir={out}"]
    log1 = run(launch + ["steps=2"])
    assert "DEEPSPEED ZeRO-2" in log1 and "world 2 x batch 8 x accum 1 = 16" in log1
    log2 = run(launch + ["steps=4"])  # same run, longer: resumes from its step-2 checkpoint
    assert "resumed from" in log2 and "step_00000002" in log2
    _compare_to_reference(out, reference)
    assert summary(out)["zero_stage"] == 2 and summary(out)["skipped_steps"] == 1


def test_zero3_torchrun_matches_resumes_and_exports(reference, shards, tmp_path):
    out = str(tmp_path / "z3")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29612",
              *NAN_AT_3, *COMMON, f"data={shards}", f"out_dir={out}", "deepspeed=configs/deepspeed/zero3.json"]
    log1 = run(launch + ["steps=2"])
    assert "DEEPSPEED ZeRO-3" in log1
    log2 = run(launch + ["steps=4"])
    assert "resumed from" in log2
    _compare_to_reference(out, reference)
    s = summary(out)
    assert s["zero_stage"] == 3 and s["world_size"] == 2
    # the gathered export loads into a plain model and reproduces the ZeRO-3 engine's eval loss
    model = GPT.from_pretrained(os.path.join(out, "final")).eval()
    ref_model = GPT.from_pretrained(os.path.join(reference, "final")).eval()
    codes, labels = eval_batch(shards, s["eval_items"])
    with torch.no_grad():
        assert float(model.compute_loss(codes, labels)["loss"]) == pytest.approx(s["final_eval_loss"], abs=1e-6)
        torch.testing.assert_close(model(codes, labels), ref_model(codes, labels), rtol=1e-4, atol=1e-4)


def test_sigkill_resume_equals_uninterrupted(tmp_path):
    """Dropout on (RNG state matters), synthetic data, 6 steps; SIGKILL after the step-2 checkpoint, rerun."""
    args = ["--config", "configs/generator/tiny.yaml", "global_batch_size=16", "batch_size=8", "log_every=1",
            "sample_every=0", "num_workers=0", "steps=6", "save_every=2", "keep_checkpoints=2", "log_with=none"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(train_cmd(*args, f"out_dir={a}"))
    cmd = train_cmd(*args, f"out_dir={b}")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(b, "checkpoints", "step_00000002", "train_state.json")
    deadline = time.time() + 300
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(b, "final"))
    log = run(cmd)
    assert "resumed from" in log
    wa = load_file(os.path.join(a, "final", "model.safetensors"))
    wb = load_file(os.path.join(b, "final", "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in mb] == list(range(1, 7))
    assert [(r["loss"], r["grad_norm"]) for r in ma] == [(r["loss"], r["grad_norm"]) for r in mb]
    assert sorted(os.listdir(os.path.join(b, "checkpoints"))) == ["step_00000004", "step_00000006"]


def test_bench_runs_on_cpu():
    out = run([sys.executable, "bench/gpu_train.py", "--preset", "GPT-tiny", "--device", "cpu", "--steps", "2",
               "--warmup", "1", "--batch-sizes", "2", "--configs", "ckpt", "--groups", "2", "--codebook-size", "64",
               "--grid", "8"])
    assert "tokens/s" in out and "GPT-tiny" in out and "ZeRO-2" in out and "| ckpt | off | full | off | 2 |" in out
    assert "_scaled_dot_product_flash_attention_for_cpu" in out  # the SDPA kernel report


# ------------------------------------------------------------------------------- with the tokenizer (pipelines/)


def _write_shards(out, n, groups, codebook_size, grid, tokenizer_sha=None):
    """Shards in the cache_codes layout (1 view), codes from learnable class templates."""
    os.makedirs(os.path.join(out, "data"))
    syn = SyntheticCodes(n, grid, groups, codebook_size, NCLS, seed=1)
    names = [f"class_{i}" for i in range(NCLS)]
    feats = datasets.Features({"codes": datasets.Array4D(shape=(1, grid, grid, groups), dtype="int16"),
                               "label": datasets.ClassLabel(names=names), "index": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"codes": syn.codes[:, None].numpy(), "label": syn.labels.numpy(),
                                     "index": np.arange(n)}, features=feats)
    pq.write_table(ds.data.table, os.path.join(out, "data/codes-00000-of-00001.parquet"))
    meta = {"format": "mgvq-codes", "version": 1, "groups": groups, "codebook_size": codebook_size,
            "grid": [grid, grid], "dtype": "int16", "views": {"mode": "test", "count": 1, "names": ["a"]},
            "class_names": names, "num_classes": NCLS, "shards": ["data/codes-00000-of-00001.parquet"],
            "counts": {"images": n, "written": n, "skipped": 0}, "complete": True,
            **({"tokenizer": {"weights_sha256": tokenizer_sha}} if tokenizer_sha else {})}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    return out


@pytest.fixture(scope="module")
def tok_and_shards(tmp_path_factory):
    from runtime.fingerprint import tokenizer_sha256
    from tokenizer import MGVQTokenizer

    base = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    MGVQTokenizer.from_preset("mgvq-tiny").save_pretrained(str(base / "tok"))  # G=4, K=256, 32 px -> 8x8
    torch.manual_seed(1)
    MGVQTokenizer.from_preset("mgvq-tiny").save_pretrained(str(base / "other"))
    shards = _write_shards(str(base / "shards"), 32, 4, 256, 8, tokenizer_sha256(str(base / "tok")))
    return base, shards


TINY = ["--config", "configs/generator/tiny.yaml", "global_batch_size=16", "batch_size=16", "log_every=1",
        "num_workers=0", "precision=fp32", "log_with=none", "steps=2", "sample_every=1", "sample_classes=[0,3]"]


def test_train_generator_with_tokenizer_decodes_samples_and_writes_a_pipeline(tok_and_shards, tmp_path):
    from PIL import Image

    from pipelines import MGVQPipeline
    from pipelines.cli import main as cli

    base, shards = tok_and_shards
    out = tmp_path / "gen"
    assert cli(["train-generator", *TINY, f"data={shards}", f"out_dir={out}", f"tokenizer={base / 'tok'}"]) == 0
    grid = Image.open(out / "samples" / "step_00000001.png")
    # one labelled row per sample class, each a decoded 32x32 image (a code map would be 8x8 x 8 = 64 px)
    assert grid.height == 2 * 34 + 2 and grid.width > 34
    pipe = MGVQPipeline.from_pretrained(str(out / "pipeline"))
    assert pipe.id2label[3] == "class_3" and pipe.generator.config.groups == 4
    assert pipe.metrics["step"] == 2 and math.isfinite(pipe.metrics["final_eval_loss"])  # the run's numbers ...
    assert "final_eval_loss" in (out / "pipeline" / "README.md").read_text()  # ... in the model card
    imgs = pipe([3], generator=torch.Generator().manual_seed(0), output_type="pt", progress=False).images
    assert imgs.shape == (1, 3, 32, 32)
    # python -m generator.train (no tokenizer): code-map grids, no pipeline
    assert main([*TINY, f"data={shards}", f"out_dir={tmp_path / 'plain'}"]) == 0
    assert Image.open(tmp_path / "plain" / "samples" / "step_00000001.png").height == 2 * 66 + 2
    assert not (tmp_path / "plain" / "pipeline").exists()


def test_codebook_from_a_tokenizer_folder_and_refusal_of_another_tokenizer(tok_and_shards, tmp_path):
    from pipelines.train_generator import main as tg_main

    base, shards = tok_and_shards
    projector = [*TINY, "sample_every=0", "steps=1", "model_overrides.input_mode=projector",
                 "model_overrides.codebook_embed_dim=32", f"data={shards}"]
    assert main(projector + [f"codebook={base / 'tok'}", f"out_dir={tmp_path / 'a'}"]) == 0
    w = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    from tokenizer import MGVQTokenizer

    want = MGVQTokenizer.from_pretrained(str(base / "tok")).codebook().reshape(-1, 8)
    assert torch.equal(w["codebook"], want)  # the frozen projector input is the tokenizer's code vectors
    for argv in ([f"codebook={base / 'other'}"], [f"tokenizer={base / 'other'}"]):
        with pytest.raises(ValueError, match=r"tokenizer .*other \(sha256 [0-9a-f]{64}\) is not the tokenizer that "
                                             r"made the codes: .*meta.json records sha256 [0-9a-f]{64}"):
            tg_main(projector + argv + [f"out_dir={tmp_path / 'b'}"])


def test_activation_checkpointing_is_applied_and_trains_the_same(tmp_path):
    """activation_checkpointing= goes through generator.perf.optimize_for_training: recompute, same numbers."""
    base = ["--config", "configs/generator/tiny.yaml", "global_batch_size=16", "batch_size=8", "log_every=1",
            "sample_every=0", "num_workers=0", "steps=2", "log_with=none", *NO_DROPOUT]
    assert main(base + [f"out_dir={tmp_path / 'a'}"]) == 0
    assert main(base + ["activation_checkpointing=full", f"out_dir={tmp_path / 'b'}"]) == 0
    la, lb = [r["loss"] for r in metrics(tmp_path / "a")], [r["loss"] for r in metrics(tmp_path / "b")]
    assert lb == pytest.approx(la, rel=1e-5)
    with pytest.raises(ValueError, match=r"activation_checkpointing='some' is invalid; valid: 'none', 'full'"):
        load_config(None, ["activation_checkpointing=some"])
