"""Reliability and safety: nothing lost on a crash, no crash on bad input, no code run from a checkpoint.

Promises (docs/reliability.md lists each with its test; some live in other test files):
  1. kill -9 + rerun == uninterrupted run (train-tokenizer, evaluate-generation here; cache-codes and train-generator in
     tests/test_cache_codes.py / tests/test_generator_train.py); a crash while a checkpoint is written loses nothing.
  2. a non-finite loss never reaches the weights; N in a row stop the run with the last good checkpoint intact.
  3. bad image files / odd image modes / tiny images are converted or skipped and counted (+ hypothesis fuzzing).
  4. bad configuration / arguments fail up front with one error naming the field, the bad value and what is valid.
  5. third-party checkpoints never run code (crafted pickle through every `mgvq convert --from` kind).
  6. an unwritable output folder or a full disk fails at start with a clear message.
"""
import collections
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from pipelines import evaluate_generation as S
from pipelines import evaluate_tokenizer as R
from generator import GPT, generate
from generator import train as gtrain
from pipelines import MGVQPipeline
from pipelines import convert as pconvert
from runtime.checkpoint import CheckpointFolder
from tokenizer import MGVQTokenizer, TokenizerConfig
from tokenizer import cache_codes as cc
from tokenizer.data import ImageDecodeError, ImageTransform, load_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# tiny stage-one run: skimage photo crops (offline), 0.3M-param tokenizer, no LPIPS (no download), PatchGAN from step 2
TOK_FAST = ["data=skimage", "num_crops=256", "model=mgvq-tiny", "model_overrides.vqgan.ch=16", "batch_size=4",
            "precision=fp32", "num_samples=0", "log_every=1", "loss.perceptual_weight=0", "loss.disc_start=2",
            "keep_checkpoints=10", "sample_every=1000"]
GEN_FAST = ["--config", "configs/generator/tiny.yaml", "global_batch_size=16", "batch_size=8", "log_every=1",
            "sample_every=0", "num_workers=0", "log_with=none", "keep_checkpoints=10", "synthetic_size=64"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one intra-op thread is much faster for these tiny models
    yield
    torch.set_num_threads(n)


def _save_bad_folder(root, rng):
    """3 classes: 5 readable images in odd formats (incl. smaller than the crop) + 3 unreadable files."""
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a" / "1_rgb.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (5, 3, 4), dtype=np.uint8), "RGBA").save(root / "a" / "2_tiny_rgba.png")
    Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16)).save(root / "b" / "3_grey16.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "b" / "4_cmyk.jpg")
    Image.fromarray(rgb[:, :, 0]).save(root / "c" / "5_grey.png")
    jpg = (root / "a" / "1_rgb.jpg").read_bytes()
    (root / "b" / "6_truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "c" / "7_zero.png").write_bytes(b"")
    (root / "c" / "8_text.jpg").write_text("not an image, despite the name")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved tiny tokenizer, a tiny pipeline (10 classes), a folder of good + bad images, a shard meta.json."""
    base = tmp_path_factory.mktemp("rel")
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny").eval()
    tok.save_pretrained(str(base / "tok"))
    gpt = GPT.from_preset("GPT-tiny", groups=tok.config.groups, codebook_size=tok.config.codebook_size, grid=8,
                          num_classes=10, head="parallel")
    torch.nn.init.normal_(gpt.output.weight, std=0.5)  # the zero-initialised head would give constant samples
    gpt.save_pretrained(str(base / "gpt"))
    MGVQPipeline(tok, gpt.eval(), id2label=[f"c{i}" for i in range(10)]).save_pretrained(str(base / "pipe"))
    _save_bad_folder(base / "images", np.random.default_rng(0))
    (base / "shards").mkdir()
    (base / "shards" / "meta.json").write_text(json.dumps(
        {"format": "mgvq-codes", "complete": True, "groups": 2, "codebook_size": 64, "grid": [8, 8],
         "num_classes": 10, "class_names": [str(i) for i in range(10)]}))
    (base / "a_file").write_text("a regular file: nothing can be created under it")
    return base


def _poll(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    assert predicate(), "timed out waiting for the kill point"


def _metric_steps(out):
    p = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(p):
        return []
    lines = open(p).read().splitlines()
    return [json.loads(ln)["step"] for ln in lines if ln.endswith("}")]


# ------------------------------------------------------------------------------ 1. kill -9 and rerun = uninterrupted


def _tok_weights(out):
    sd = load_file(os.path.join(out, "final", "model.safetensors"))
    # quantize.codebook_used is the usage window, a non-persistent position -> documented in test_tokenizer_train
    return {k: v for k, v in sd.items() if k != "quantize.codebook_used"}


def test_train_tokenizer_sigkill_resume_equals_uninterrupted(tmp_path):
    kill_at = random.Random(20240611).randint(6, 7)  # a step between the checkpoints at 5 and 10
    args = [sys.executable, "-m", "tokenizer.train", *TOK_FAST, "steps=10", "save_every=5"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    subprocess.run(args + [f"out_dir={a}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    proc = subprocess.Popen(args + [f"out_dir={b}"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _poll(lambda: kill_at in _metric_steps(b), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not os.path.exists(os.path.join(b, "final"))
    assert os.listdir(os.path.join(b, "checkpoints")) == ["step_00000005"]
    r = subprocess.run(args + [f"out_dir={b}"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and "step_00000005" in r.stdout + r.stderr
    assert _metric_steps(b) == list(range(1, 11))  # lines past the checkpoint were dropped, then recomputed
    ma = [json.loads(ln) for ln in open(os.path.join(a, "metrics.jsonl"))]
    mb = [json.loads(ln) for ln in open(os.path.join(b, "metrics.jsonl"))]
    keys = ("total", "l2", "vq", "commit", "g_adv", "d_loss", "grad_norm", "disc_grad_norm")
    assert [[m.get(k) for k in keys] for m in ma] == [[m.get(k) for k in keys] for m in mb]
    assert ma[-1]["d_loss"] is not None  # the PatchGAN was on, so its state was resumed too
    wa, wb = _tok_weights(a), _tok_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _crash_during_save(monkeypatch, save_number):
    """Make the `save_number`-th checkpoint die half-way, as a kill -9 mid-write would: its model file is truncated
    and nothing after it is written (fault injection from the test: runtime.checkpoint.save_module is patched)."""
    from runtime import checkpoint

    real, calls = checkpoint.save_module, {"n": 0}

    def dying_save_module(stem, module):
        real(stem, module)
        if os.path.basename(str(stem)) == "model":
            calls["n"] += 1
            if calls["n"] == save_number:
                path = f"{stem}.safetensors"
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                raise KeyboardInterrupt("simulated kill while writing a checkpoint")

    monkeypatch.setattr(checkpoint, "save_module", dying_save_module)


def test_train_tokenizer_crash_while_saving_a_checkpoint_loses_nothing(tmp_path, monkeypatch):
    from tokenizer.train import main

    common = TOK_FAST + ["steps=6", "save_every=2"]
    main(common + [f"out_dir={tmp_path / 'a'}"])
    with monkeypatch.context() as m:
        _crash_during_save(m, save_number=3)  # the step-6 checkpoint
        with pytest.raises(KeyboardInterrupt):
            main(common + [f"out_dir={tmp_path / 'b'}"])
    main(common + [f"out_dir={tmp_path / 'b'}"])  # must resume from step 4, not load the torn step-6 folder
    wa, wb = _tok_weights(tmp_path / "a"), _tok_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_generator_crash_while_saving_a_checkpoint_loses_nothing(tmp_path, monkeypatch):
    common = GEN_FAST + ["steps=6", "save_every=2"]
    gtrain.main(common + [f"out_dir={tmp_path / 'a'}"])
    with monkeypatch.context() as m:
        _crash_during_save(m, save_number=3)
        with pytest.raises(KeyboardInterrupt):
            gtrain.main(common + [f"out_dir={tmp_path / 'b'}"])
    assert CheckpointFolder(tmp_path / "b").latest().name == "step_00000004"  # the torn one is invisible
    gtrain.main(common + [f"out_dir={tmp_path / 'b'}"])
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not [n for n in os.listdir(tmp_path / "b" / "checkpoints") if n.startswith(".tmp")]


def test_evaluate_generation_sigkill_resume_equals_uninterrupted(assets, tmp_path):
    n = 16
    args = ["--pipeline", str(assets / "pipe"), "--num-images", str(n), "--batch-size", "2", "--top-k", "32",
            "--seed", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert S.main(args + ["--out", str(a)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.evaluate_generation", *args, "--out", str(b)], cwd=ROOT,
                            env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.Random(7).randint(2, 8)  # images written before the kill
    _poll(lambda: (b / "images").is_dir() and len(list((b / "images").glob("*.png"))) >= kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (b / "samples.npz").exists() and len(list((b / "images").glob("*.png"))) < n
    assert S.main(args + ["--out", str(b)]) == 0
    assert sorted(p.name for p in (b / "images").iterdir()) == [f"{i:06d}.png" for i in range(n)]  # no tmp left
    for i in range(n):
        assert (a / "images" / f"{i:06d}.png").read_bytes() == (b / "images" / f"{i:06d}.png").read_bytes(), i
    with np.load(a / "samples.npz") as fa, np.load(b / "samples.npz") as fb:
        np.testing.assert_array_equal(fa["arr_0"], fb["arr_0"])
        np.testing.assert_array_equal(fa["arr_1"], fb["arr_1"])
        assert len(np.unique(fa["arr_0"].reshape(n, -1), axis=0)) > 1  # really different images


# ---------------------------------------------------------------- 2. non-finite losses never reach the weights


def _ckpt_params(path):
    sd = load_file(os.path.join(path, "model.safetensors"))
    names = {n for n, _ in MGVQTokenizer.from_preset("mgvq-tiny", **{"vqgan.ch": 16}).named_parameters()}
    return {k: v for k, v in sd.items() if k in names}


def test_train_tokenizer_nonfinite_skipped_weights_untouched_then_stop_keeps_checkpoint(tmp_path, monkeypatch):
    """NaN latents (an overflowing encoder) at chosen steps: the step is skipped and counted, no parameter changes
    (the quantizer's dead-code re-init must not copy NaN features into the codebook: before that guard this crashed
    in torch.multinomial), and N in a row stop the run with the last good checkpoint intact."""
    from tokenizer.quantizer import MultiGroupQuantizer
    from tokenizer.train import main

    real, calls = MultiGroupQuantizer.forward, {"n": 0, "nan": set()}

    def forward(self, z, *args, **kw):
        calls["n"] += 1
        return real(self, z * float("nan") if calls["n"] in calls["nan"] else z, *args, **kw)

    monkeypatch.setattr(MultiGroupQuantizer, "forward", forward)
    common = TOK_FAST + ["loss.disc_weight=0", "save_every=1"]
    calls["nan"] = {3, 4}
    a = tmp_path / "a"
    main(common + ["steps=5", "max_nonfinite=3", f"out_dir={a}"])
    m = [json.loads(ln) for ln in open(a / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in m] == [0, 0, 1, 2, 2]
    w = {s: _ckpt_params(a / "checkpoints" / f"step_{s:08d}") for s in (1, 2, 3, 4, 5)}
    assert any(not torch.equal(w[1][k], w[2][k]) for k in w[1])  # finite steps train
    for s in (3, 4):  # the NaN steps changed no parameter at all (codebook included)
        assert all(torch.equal(w[2][k], w[s][k]) for k in w[2]), s
    assert any(not torch.equal(w[4][k], w[5][k]) for k in w[4]) and all(v.isfinite().all() for v in w[5].values())

    calls["n"], calls["nan"] = 0, set(range(3, 100))
    b = tmp_path / "b"
    with pytest.raises(RuntimeError, match=r"2 non-finite steps in a row \(max_nonfinite=2\) at steps 3..4"):
        main(common + ["steps=8", "save_every=2", "max_nonfinite=2", f"out_dir={b}"])
    assert os.listdir(b / "checkpoints") == ["step_00000002"] and not (b / "final").exists()
    kept = _ckpt_params(b / "checkpoints" / "step_00000002")  # the last good checkpoint, intact and loadable
    assert all(torch.equal(kept[k], w[2][k]) for k in kept)


def test_train_generator_nonfinite_in_a_row_stops_with_last_checkpoint_intact(tmp_path, monkeypatch):
    from _inject_nan import patch

    common = GEN_FAST + ["save_every=2", "max_nonfinite=2", "precision=fp32"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    gtrain.main(common + ["steps=2", f"out_dir={a}"])  # the same run, stopped cleanly at step 2
    patch({3, 4, 5}, monkeypatch.setattr)  # rank 0's loss is NaN at steps 3, 4, 5
    with pytest.raises(RuntimeError, match=r"2 non-finite steps in a row \(max_nonfinite=2\) at steps 3\.\.4.*"
                                           r"last checkpoint: .*step_00000002"):
        gtrain.main(common + ["steps=8", f"out_dir={b}"])
    assert [c.name for c in CheckpointFolder(b).list()] == ["step_00000002"]
    assert not os.path.exists(os.path.join(b, "final"))
    wa = load_file(os.path.join(a, "checkpoints", "step_00000002", "model.safetensors"))
    wb = load_file(os.path.join(b, "checkpoints", "step_00000002", "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    m = [json.loads(ln) for ln in open(os.path.join(b, "metrics.jsonl"))]
    assert [(r["step"], r["skipped_steps"]) for r in m] == [(1, 0), (2, 0), (3, 1)]  # it stops inside step 4


# ------------------------------------------------------------------------------------------------- 3. bad data


def test_bad_files_are_skipped_converted_and_counted_in_log_and_metadata(assets, tmp_path):
    from tokenizer.train import main

    # stage-one training: 8 files, 2 steps of 4 cover each once; the 3 unreadable ones are counted in the log
    out = tmp_path / "tok"
    main(["data=" + str(assets / "images"), "model=mgvq-tiny", "model_overrides.vqgan.ch=16", "image_size=32",
          "batch_size=4", "steps=2", "log_every=1", "num_samples=0", "precision=fp32", "save_every=2",
          "loss.perceptual_weight=0", "loss.disc_weight=0", f"out_dir={out}"])
    m = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert m[-1]["decode_failures"] == 3 and json.load(open(out / "summary.json"))["decode_failures"] == 3
    # stage-one cache: the 5 readable files (RGBA 5x3 < crop, 16-bit, CMYK, grey) are written, 3 skipped + counted
    assert cc.main(["--tokenizer", str(assets / "tok"), "--data", str(assets / "images"), "--out",
                    str(tmp_path / "codes"), "--num-workers", "0", "--shard-size", "3"]) == 0
    meta = json.load(open(tmp_path / "codes" / "meta.json"))
    assert meta["counts"] == {"images": 8, "written": 5, "skipped": 3, "skipped_indices": [4, 6, 7]}


def test_any_decoder_failure_is_skipped_and_counted(tmp_path):
    """Found by fuzzing: a file with a corrupt DDS header (whatever its name) makes PIL raise NotImplementedError."""
    from tokenizer.data import ImageFolderDataset

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="DDS")
    dds = bytearray(buf.getvalue())
    dds[80:84] = b"\0\0\0\0"  # pixel-format flags 0: "Unknown pixel format flags 0"
    (tmp_path / "a_bad.jpg").write_bytes(bytes(dds))
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(tmp_path / "b_good.png")
    with pytest.raises(ImageDecodeError):
        load_rgb(bytes(dds))
    ds = ImageFolderDataset(tmp_path, ImageTransform(8, "center_crop", hflip=False))
    assert ds[0]["failed"] == 1 and ds.failures == 1


_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
_FORMATS = {"PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}, "JPEG": {"L", "RGB", "CMYK"},
            "TIFF": {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"}, "BMP": {"1", "L", "P", "RGB"},
            "WEBP": {"RGB", "RGBA"}, "GIF": {"L", "P"}}


def _random_image(mode, h, w, seed):
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I"):
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).convert(mode) if mode == "I" \
            else Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.normal(size=(h, w)).astype(np.float32), "F")
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(_MODES), fmt=st.sampled_from(sorted(_FORMATS)), h=st.integers(1, 70),
       w=st.integers(1, 70), seed=st.integers(0, 2**16), size=st.sampled_from([8, 16, 32]))
def test_property_any_image_shape_and_mode_becomes_a_valid_crop(mode, fmt, h, w, seed, size):
    if mode not in _FORMATS[fmt]:
        mode = "RGB"
    buf = io.BytesIO()
    _random_image(mode, h, w, seed).save(buf, format=fmt)
    img = load_rgb(buf.getvalue())
    assert img.mode == "RGB" and img.size == (w, h)
    for aug in ("random_crop", "center_crop", "resize"):  # tokenizer.data training / eval transforms
        x = ImageTransform(size, aug)(img, random.Random(seed))
        assert x.shape == (3, size, size) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    for views in ("flip", "ten-crop"):  # the cache-codes input path
        v = cc.make_views(img, size, views)
        assert v.shape == (len(cc.view_names(views)), 3, size, size) and v.dtype == np.uint8


def _encoded_seeds():
    """Real encoded images to corrupt (each format's header, so the fuzzing reaches the decoders' insides)."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    out = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


_SEEDS = _encoded_seeds()


@st.composite
def _bad_bytes(draw):
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "header+random"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    good = draw(st.sampled_from(_SEEDS))
    if kind == "truncated":
        return good[:draw(st.integers(0, len(good) - 1))]
    if kind == "flipped":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    return good[:draw(st.integers(4, 64))] + draw(st.binary(max_size=256))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_bad_bytes())
def test_property_random_bytes_never_crash_the_loaders(data):
    # tokenizer.data decoding: an RGB image or ImageDecodeError (which the datasets count and skip), nothing else
    try:
        img = load_rgb(data)
    except ImageDecodeError:
        img = None
    if img is not None:
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    # the cache-codes input path on a folder holding that file: views, or a skip with a reason, never an exception
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "x.jpg"), "wb") as f:
            f.write(data)
        source, _ = cc.open_source(d)
        views, label, i = cc._ViewsDataset(source, 8, "flip")[0]
        if img is None:
            assert views is None and isinstance(label, str) and "x.jpg" in label
        else:
            assert views.shape == (2, 3, 8, 8) and views.dtype == torch.uint8


# ------------------------------------------------------------------------- 4. bad configuration and arguments

def _gen_train(*overrides):
    return lambda a, tmp: gtrain.main(GEN_FAST + [f"out_dir={tmp / 'g'}", "steps=1",
                                                  *(o.replace("{shards}", str(a / "shards")) for o in overrides)])


def _init_from_other_grid(a, tmp):
    GPT.from_preset("GPT-tiny", groups=2, codebook_size=64, grid=4, num_classes=10).save_pretrained(str(tmp / "g4"))
    gtrain.main(GEN_FAST + [f"out_dir={tmp / 'g'}", "steps=1", f"init_from={tmp / 'g4'}"])


def _sample(*extra):
    """evaluate-generation's command line; a usage error (argparse: exit 2, message on stderr) is re-raised as a
    SystemExit carrying that message, so the table can match it."""
    def call(a, tmp):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                return S.main(["--pipeline", str(a / "pipe"), "--out", str(tmp / "s"), "--num-images", "2", *extra])
        except SystemExit as e:
            raise SystemExit(err.getvalue() if e.code == 2 else e.code) from None
    return call


def _pipe_call(**kw):
    return lambda a, tmp: MGVQPipeline.from_pretrained(str(a / "pipe"))([0], progress=False, **kw)


def _cache(*extra):
    return lambda a, tmp: cc.main(["--tokenizer", str(a / "tok"), "--data", str(a / "images"), "--out",
                                   str(tmp / "c"), "--num-workers", "0", *extra])


def _tok_train_cfg(*overrides):
    def f(a, tmp):
        from tokenizer.train import build_model, load_config

        build_model(load_config(None, list(overrides)))
    return f


def _mismatched_pipeline(a, tmp):
    tok = MGVQTokenizer.from_pretrained(str(a / "tok"))
    MGVQPipeline(tok, GPT.from_preset("GPT-tiny", groups=2, codebook_size=256, grid=8, num_classes=10))


CONFIG_ERRORS = [
    # (id, call(assets, tmp_path), exception, regex naming the field, the bad value and what is valid)
    ("tokenizer C % G", lambda a, t: TokenizerConfig.from_dict({"latent_dim": 30, "groups": 4}), ValueError,
     r"latent_dim \(30\) must be a positive multiple of groups \(4\)"),
    ("tokenizer K < 2", lambda a, t: MGVQTokenizer.from_preset("mgvq-tiny", codebook_size=1), ValueError,
     r"codebook_size \(codes per group\) must be >= 2, got 1"),
    ("unknown tokenizer preset", lambda a, t: MGVQTokenizer.from_preset("mgvq-tinny"), ValueError,
     r"unknown tokenizer preset 'mgvq-tinny'.*Valid presets: .*mgvq-tiny"),
    ("train-tokenizer unknown preset", _tok_train_cfg("steps=1", "model=f16-g9"), ValueError,
     r"unknown tokenizer preset 'f16-g9'.*Valid presets:"),
    ("train-tokenizer batch_size", _tok_train_cfg("steps=1", "batch_size=0"), ValueError,
     r"batch_size=0 is invalid; must be an integer >= 1"),
    ("unknown GPT preset", lambda a, t: GPT.from_preset("GPT-Q"), ValueError, r"unknown GPT preset 'GPT-Q'; valid: .*GPT-B"),
    ("train-generator unknown preset", _gen_train("model=GPT-Q"), ValueError,
     r"model='GPT-Q' is invalid; unknown preset; valid: .*GPT-tiny"),
    ("train-generator unknown key", _gen_train("lrr=1"), ValueError, r"training config: unknown key\(s\): lrr \(did you mean lr\?\)"),
    ("K too large for the index dtype", lambda a, t: cc.code_dtype(2**31 + 1), ValueError,
     r"codebook_size=2147483649 does not fit the int32 code type; valid: 2 <= codebook_size <= 2\*\*31"),
    ("grid: shards vs generator", _gen_train("data={shards}", "model_overrides.grid=4"), ValueError,
     r"model_overrides.grid=4 but the shards in .* have grid=8"),
    ("G: shards vs generator", _gen_train("data={shards}", "model_overrides.groups=4"), ValueError,
     r"model_overrides.groups=4 but the shards in .* have groups=2"),
    ("grid: init_from vs data", _init_from_other_grid, ValueError,
     r"init_from=.* has grid=4 but the data 'synthetic' has grid=8"),
    ("G/K: tokenizer vs generator", _mismatched_pipeline, ValueError,
     r"tokenizer has G=4 groups but the generator predicts G=2"),
    ("grid: tokenizer image size vs downsample", _cache("--image-size", "30"), ValueError,
     r"--image-size=30: must be a multiple of the tokenizer's downsample 4"),
    ("cache-codes batch size", _cache("--batch-size", "0"), ValueError, r"--batch-size=0: must be >= 1"),
    ("label out of range: pipeline", lambda a, t: MGVQPipeline.from_pretrained(str(a / "pipe"))([12]), ValueError,
     r"class labels \[12\] out of range: valid labels are 0..9"),
    ("label out of range: generate", lambda a, t: generate(GPT.from_pretrained(str(a / "gpt")), torch.tensor([11])),
     ValueError, r"class_labels must be in \[0, 10\].*got \[11\]"),
    ("label out of range: train-generator samples", _gen_train("sample_classes=[3,12]"), ValueError,
     r"sample_classes=\[3, 12\]: \[12\] out of range; valid: 0..9"),
    ("label out of range: evaluate-generation", _sample("--num-classes", "20"), ValueError,
     r"--num-classes=20 is invalid; valid: 1..10"),
    ("sampling top_p", _sample("--top-p", "1.5"), SystemExit,
     r"--top-p '1.5': '1.5' is out of range; each value must be a number in \(0, 1\]"),
    ("sampling temperature", _sample("--temperature", "-1"), SystemExit,
     r"--temperature '-1': '-1' is out of range; each value must be a finite number >= 0"),
    ("sampling guidance", _sample("--guidance-scale", "-2"), SystemExit,
     r"--guidance-scale=-2.0 is invalid; valid: a finite number >= 0"),
    ("sampling top_k > K", _sample("--top-k", "100000"), SystemExit,
     r"--top-k 100000: a top-k above the codebook size K=256 is invalid; valid: 0..256"),
    ("sampling num images", _sample("--num-images", "0"), SystemExit, r"--num-images=0 is invalid; valid: an integer >= 1"),
    ("sampling batch size", _sample("--batch-size", "0"), SystemExit, r"--batch-size=0 is invalid; valid: an integer >= 1"),
    ("pipeline top_p", _pipe_call(top_p=0.0), ValueError, r"top_p=0.0: must be in \(0, 1\]"),
    ("train-generator sample_top_k", _gen_train("sample_top_k=-1"), ValueError,
     r"sample_top_k=-1 is invalid; must be null or an integer >= 0"),
    ("train-generator sample_cfg_scale", _gen_train("sample_cfg_scale=-1"), ValueError,
     r"sample_cfg_scale=-1.0 is invalid; must be >= 0"),
    ("evaluate-tokenizer resolution", lambda a, t: R.main(["--tokenizer", str(a / "tok"), "--data", str(a / "images"),
                                                           "--out", str(t / "r"), "--resolution", "0"]),
     ValueError, r"resolution='0': width and height must be positive"),
    ("evaluate-tokenizer batch size", lambda a, t: R.main(["--tokenizer", str(a / "tok"), "--data", str(a / "images"),
                                                           "--out", str(t / "r"), "--batch-size", "0"]),
     SystemExit, r"--batch-size=0 is invalid; valid: an integer >= 1"),
    ("convert unknown kind", lambda a, t: pconvert.main(["--from", "llamagen-vqq", "x.pt", str(t / "o")]), SystemExit,
     r"--from 'llamagen-vqq' is not a known kind; valid: llamagen-vq, mgvq-tokenizer"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_bad_configuration_fails_up_front_with_one_clear_error(assets, tmp_path, call, exc, match):
    with pytest.raises(exc, match=match):
        call(assets, tmp_path)
    for sub in ("g", "s", "c"):  # nothing was trained / sampled / cached before the error
        assert not (tmp_path / sub / "checkpoints").exists() and not (tmp_path / sub / "images").exists()
        assert not (tmp_path / sub / "data").exists()


# ------------------------------------------------------------------ 5. a checkpoint never runs code when loaded


class _Payload:
    """Unpickling this calls os.system("touch <marker>"): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path, marker):
    w = torch.zeros(2, 2)
    torch.save({"model": {"encoder.conv_in.weight": w, "trap": _Payload(marker)}, "ema": {"x": _Payload(marker)}},
               path)
    return path


def test_crafted_pickle_is_live_when_unpickled_unsafely(tmp_path):
    """Control: the payload really runs under a plain pickle load, so the tests below would catch a regression."""
    marker = tmp_path / "pwned"
    _evil_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["llamagen-vq", "mgvq-tokenizer", "llamagen-gpt", "mgvq-gpt", "pipeline"])
def test_convert_refuses_a_malicious_pickle_for_every_kind(assets, tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = str(_evil_checkpoint(tmp_path / "c2i_B_256.pt", marker))
    out = tmp_path / "out"
    if kind == "pipeline":  # folders: a pickle posing as the weights file is refused by safetensors
        for sub in ("tok", "gpt"):
            shutil.copytree(assets / sub, tmp_path / sub)
            shutil.copy(evil, tmp_path / sub / "model.safetensors")
        argv = ["--from", "pipeline", str(tmp_path / "tok"), str(tmp_path / "gpt"), str(out)]
        match = r"(?i)header|safetensor|deserializ"
    else:
        argv = ["--from", kind, evil, str(out)] + (["--tokenizer", str(assets / "tok")] if kind == "mgvq-gpt" else [])
        match = r"Weights only load failed"
    with pytest.raises(Exception, match=match):
        pconvert.main(argv)
    assert not marker.exists(), "the checkpoint ran code"
    assert not (out / "model.safetensors").exists()


def test_codebook_and_weights_files_are_safetensors_only(tmp_path):
    from generator.convert import load_codebook_file

    marker = tmp_path / "pwned"
    evil = str(_evil_checkpoint(tmp_path / "codebook.safetensors", marker))
    with pytest.raises(Exception, match=r"(?i)header|safetensor|deserializ"):
        load_codebook_file(evil)
    for cls in (MGVQTokenizer, GPT):
        (tmp_path / cls.__name__).mkdir()
        shutil.copy(evil, tmp_path / cls.__name__ / "model.safetensors")
        (tmp_path / cls.__name__ / "config.json").write_text("{}")
        with pytest.raises(Exception):
            cls.from_pretrained(str(tmp_path / cls.__name__))
    assert not marker.exists()


# ---------------------------------------------------------------- 6. unwritable output / full disk fail at start


def _entry_points(a):
    return {
        "cache-codes": lambda out: cc.main(["--tokenizer", str(a / "tok"), "--data", str(a / "images"), "--out", out,
                                            "--num-workers", "0"]),
        "train-generator": lambda out: gtrain.main(GEN_FAST + ["steps=1", f"out_dir={out}"]),
        "evaluate-generation": lambda out: S.main(["--pipeline", str(a / "pipe"), "--num-images", "2", "--out", out]),
        "evaluate-tokenizer": lambda out: R.main(["--tokenizer", str(a / "tok"), "--data", str(a / "images"),
                                                  "--out", out]),
        "convert llamagen-vq": lambda out: pconvert.main(["--from", "llamagen-vq", "missing.pt", out]),
        "convert mgvq-tokenizer": lambda out: pconvert.main(["--from", "mgvq-tokenizer", "missing.pt", out]),
        "convert llamagen-gpt": lambda out: pconvert.main(["--from", "llamagen-gpt", "missing.pt", out]),
        "convert mgvq-gpt": lambda out: pconvert.main(["--from", "mgvq-gpt", "missing.pt", out, "--tokenizer",
                                                       str(a / "tok")]),
        "convert pipeline": lambda out: pconvert.main(["--from", "pipeline", str(a / "tok"), str(a / "gpt"), out]),
    }


ENTRY_POINTS = ["cache-codes", "train-generator", "evaluate-generation", "evaluate-tokenizer", "convert llamagen-vq",
                "convert mgvq-tokenizer", "convert llamagen-gpt", "convert mgvq-gpt", "convert pipeline"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unwritable_output_folder_fails_at_start(assets, entry):
    # tests run as root, where chmod does not stop writes: a folder under a regular FILE can never be created
    out = str(assets / "a_file" / "out")
    with pytest.raises(OSError, match=r"is not writable \(NotADirectoryError.*choose a folder that can be created"):
        _entry_points(assets)[entry](out)
    with pytest.raises(OSError, match=r"'/proc/mgvq-out' is not writable"):
        _entry_points(assets)[entry]("/proc/mgvq-out")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_full_disk_fails_at_start(assets, tmp_path, monkeypatch, entry):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 5 * 2**20, 5 * 2**20))
    out = tmp_path / "out"
    with pytest.raises(OSError, match=r"only 5.0 MiB free on its filesystem, at least 100.0 MiB needed; free some"):
        _entry_points(assets)[entry](str(out))
    assert os.listdir(out) == []  # failed before writing anything


def test_free_space_estimate_scales_with_the_run(assets, tmp_path, monkeypatch):
    """The check asks for what the run will write when that is more than the 100 MiB floor (50k samples at 256 px
    need 9.2 GiB for samples.npz): 5 GiB free is refused before any sampling."""
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 5 * 2**30, 5 * 2**30))
    with pytest.raises(OSError, match=r"only 5120.0 MiB free on its filesystem, at least 9375.0 MiB needed"):
        S.main(["--pipeline", str(assets / "pipe"), "--num-images", "50000", "--resize-to", "256",
                "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s" / "images").exists()


def test_train_tokenizer_unwritable_output_or_full_disk_fails_at_start(assets, tmp_path, monkeypatch):
    from tokenizer.train import main

    with pytest.raises(OSError, match=r"out_dir '.*a_file/out' is not writable"):
        main(TOK_FAST + ["steps=1", f"out_dir={assets / 'a_file' / 'out'}"])
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(OSError, match=r"out_dir .* only 5.0 MiB free"):
        main(TOK_FAST + ["steps=1", f"out_dir={tmp_path / 'o'}"])


# ------------------------------------------------------------- 7. resume reads no pickle; one run per output folder


def test_resume_reads_only_safetensors_and_json(tmp_path, monkeypatch):
    """Checkpoints hold safetensors + JSON only, and resuming never unpickles: with torch.load / pickle disabled a
    resumed run still ends bit-identical to an uninterrupted one (both stages)."""
    import pickle

    from tokenizer.train import main as tok_main

    tok_common = TOK_FAST + ["save_every=2", "ema=true", "ema_decay=0.9"]
    gen_common = GEN_FAST + ["save_every=2", "ema=true", "ema_decay=0.9"]
    tok_main(tok_common + ["steps=4", f"out_dir={tmp_path / 'ta'}"])
    gtrain.main(gen_common + ["steps=4", f"out_dir={tmp_path / 'ga'}"])
    tok_main(tok_common + ["steps=2", f"out_dir={tmp_path / 'tb'}"])
    gtrain.main(gen_common + ["steps=2", f"out_dir={tmp_path / 'gb'}"])
    for run in ("tb", "gb"):
        files = os.listdir(tmp_path / run / "checkpoints" / "step_00000002")
        assert files and all(f.endswith((".safetensors", ".json")) for f in files), files

    def refuse(*a, **k):
        raise AssertionError("resume unpickled something")

    with monkeypatch.context() as m:
        m.setattr(torch, "load", refuse)
        m.setattr(pickle, "load", refuse)
        m.setattr(pickle, "loads", refuse)
        tok_main(tok_common + ["steps=4", f"out_dir={tmp_path / 'tb'}"])
        gtrain.main(gen_common + ["steps=4", f"out_dir={tmp_path / 'gb'}"])
    for a, b in (("ta", "tb"), ("ga", "gb")):
        for final in ("final", "final_ema"):
            wa = load_file(str(tmp_path / a / final / "model.safetensors"))
            wb = load_file(str(tmp_path / b / final / "model.safetensors"))
            assert all(torch.equal(wa[k], wb[k]) for k in wa if k != "quantize.codebook_used"), (a, final)


def test_a_second_run_on_the_same_output_folder_refuses(tmp_path):
    from runtime.outdir import FolderLockedError, RunLock
    from tokenizer.train import main as tok_main

    with RunLock(tmp_path / "run"):  # a live run holds the folder
        with pytest.raises(FolderLockedError, match=r"out_dir '.*run' is in use by a running job \(pid \d+"):
            gtrain.main(GEN_FAST + ["steps=1", f"out_dir={tmp_path / 'run'}"])
        with pytest.raises(FolderLockedError, match="in use by a running job"):
            tok_main(TOK_FAST + ["steps=1", f"out_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run" / "checkpoints").exists()
    gtrain.main(GEN_FAST + ["steps=1", f"out_dir={tmp_path / 'run'}"])  # free once the holder is gone
