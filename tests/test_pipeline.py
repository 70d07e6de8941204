"""MGVQPipeline: save/load round trip, input validation, per-group sampling settings, output types."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from generator import GPT
from pipelines import MGVQPipeline
from tokenizer import MGVQTokenizer

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
G, K, GRID = 4, 256, 8


def make_generator(groups=G, codebook_size=K, seed=0):
    torch.manual_seed(seed)
    gpt = GPT.from_preset("GPT-tiny", groups=groups, codebook_size=codebook_size, grid=GRID, num_classes=10,
                          head="parallel")
    # the output head is zero-initialised (uniform logits); give it weights so samples depend on label and seed
    torch.nn.init.normal_(gpt.output.weight, std=0.5)
    return gpt.eval()


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny").eval()
    return MGVQPipeline(tok, make_generator(), id2label=NAMES)


def run(pipe, labels, seed=0, **kw):
    kw.setdefault("progress", False)
    return pipe(labels, generator=torch.Generator().manual_seed(seed), **kw)


def test_save_load_round_trip_same_images(pipe, tmp_path):
    pipe.defaults.guidance_scale = 3.0
    try:
        a = run(pipe, [0, 7, 9], seed=123, output_type="pt")
        pipe.save_pretrained(str(tmp_path / "p"))
        loaded = MGVQPipeline.from_pretrained(str(tmp_path / "p"))
    finally:
        pipe.defaults.guidance_scale = 4.0
    assert loaded.id2label == pipe.id2label
    assert loaded.defaults.guidance_scale == 3.0
    assert loaded.image_size == 32
    b = run(loaded, [0, 7, 9], seed=123, output_type="pt")
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.images, b.images)
    # the seed matters: another seed gives other codes
    c = run(loaded, [0, 7, 9], seed=124, output_type="pt")
    assert not torch.equal(a.codes, c.codes)


def test_output_types_shapes_and_ranges(pipe):
    pt = run(pipe, [1, 2], output_type="pt")
    assert isinstance(pt.images, torch.Tensor) and pt.images.shape == (2, 3, 32, 32) and pt.images.dtype == torch.float32
    assert float(pt.images.min()) >= 0.0 and float(pt.images.max()) <= 1.0
    assert pt.codes.shape == (2, GRID, GRID, G) and pt.codes.dtype == torch.int64
    assert int(pt.codes.min()) >= 0 and int(pt.codes.max()) < K

    npo = run(pipe, [1, 2], output_type="np")
    assert isinstance(npo.images, np.ndarray) and npo.images.shape == (2, 32, 32, 3)
    assert npo.images.min() >= 0.0 and npo.images.max() <= 1.0
    np.testing.assert_allclose(npo.images, pt.images.permute(0, 2, 3, 1).numpy())  # same seed, same pixels

    pil = run(pipe, [1, 2], output_type="pil")
    assert isinstance(pil.images, list) and len(pil.images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in pil.images)
    np.testing.assert_array_equal(np.asarray(pil.images[0]),
                                  (pt.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

    (tup,) = run(pipe, [1], output_type="pt", return_dict=False)
    assert tup.shape == (1, 3, 32, 32)


def test_labels_by_name_and_images_per_label(pipe):
    assert pipe.get_label_ids(["sneaker", "Ankle boot", "t-shirt/top"]) == [7, 9, 0]
    out = run(pipe, ["Bag", 3], num_images_per_label=2, output_type="pt", batch_size=3)
    assert out.images.shape == (4, 3, 32, 32)
    by_id = run(pipe, [8, 3], num_images_per_label=2, output_type="pt", batch_size=3)
    assert torch.equal(out.codes, by_id.codes)


def test_per_group_lists_accepted(pipe):
    out = run(pipe, [0, 1], temperature=[1.0, 0.9, 0.8, 0.7], top_k=[5, 10, 0, None], top_p=[0.9, 1.0, 0.5, None],
              output_type="pt")
    assert out.codes.shape == (2, GRID, GRID, G)
    # top_k=1 on a group is greedy there: the same sub-tokens whatever the seed; other groups still vary
    a = run(pipe, [0, 1], top_k=[1, 0, 0, 0], guidance_scale=1.0, output_type="pt", seed=1)
    b = run(pipe, [0, 1], top_k=[1, 0, 0, 0], guidance_scale=1.0, output_type="pt", seed=2)
    assert not torch.equal(a.codes[..., 1:], b.codes[..., 1:])
    # group 0 at position 0 depends only on the label (greedy), so it agrees across seeds
    assert torch.equal(a.codes[:, 0, 0, 0], b.codes[:, 0, 0, 0])


def test_groups_to_use_changes_decoding_not_codes(pipe):
    full = run(pipe, [4], output_type="pt")
    coarse = run(pipe, [4], output_type="pt", groups_to_use=1)
    assert torch.equal(full.codes, coarse.codes)
    assert not torch.allclose(full.images, coarse.images)


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_labels=[10]), r"out of range: valid labels are 0\.\.9"),
    (dict(class_labels=[-1]), r"out of range"),
    (dict(class_labels=[0], guidance_scale=-1.0), r"guidance_scale=-1\.0: must be >= 0"),
    (dict(class_labels=[0], top_k=K + 1), rf"top_k={K + 1}: must be in 0\.\.K={K}"),
    (dict(class_labels=[0], top_k=[1, 2, 3, K + 5]), rf"top_k={K + 5}"),
    (dict(class_labels=[0], top_p=0.0), r"top_p=0\.0: must be in \(0, 1\]"),
    (dict(class_labels=[0], top_p=1.5), r"top_p=1\.5: must be in \(0, 1\]"),
    (dict(class_labels=[0], top_p=-0.1), r"top_p=-0\.1"),
    (dict(class_labels=[0], temperature=[1.0, 1.0]), r"per-group list needs G=4 values"),
    (dict(class_labels=[0], temperature=-1.0), r"temperature=-1\.0: must be >= 0"),
    (dict(class_labels=[0], groups_to_use=5), r"groups_to_use=5: must be in 1\.\.G=4"),
    (dict(class_labels=[0], output_type="jpg"), r"output_type='jpg'"),
    (dict(class_labels=[0], num_images_per_label=0), r"num_images_per_label=0"),
])
def test_bad_inputs_raise(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(progress=False, **kwargs)


def test_unknown_class_name_suggests_close_matches(pipe):
    with pytest.raises(ValueError, match=r"unknown class name 'snekaer'.*Close matches: \['sneaker'") as e:
        pipe("snekaer", progress=False)
    assert "10 classes" in str(e.value)
    with pytest.raises(ValueError, match=r"unknown class name 'zebra'"):
        pipe.get_label_ids(["bag", "zebra"])


def test_mismatched_tokenizer_and_generator_raise(pipe):
    tok = pipe.tokenizer
    with pytest.raises(ValueError, match=r"tokenizer has G=4 groups but the generator predicts G=2"):
        MGVQPipeline(tok, make_generator(groups=2), id2label=NAMES)
    with pytest.raises(ValueError, match=r"tokenizer has K=256 codes per group but the generator has K=128"):
        MGVQPipeline(tok, make_generator(codebook_size=128), id2label=NAMES)
    with pytest.raises(ValueError, match=r"id2label must name exactly the generator's 10 classes"):
        MGVQPipeline(tok, make_generator(), id2label=NAMES[:9])


def test_from_pretrained_missing_folder_is_loud(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        MGVQPipeline.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no pipeline_config\.json"):
        MGVQPipeline.from_pretrained(str(tmp_path / "empty"))


# ---- diffusers conventions: per-image seeds, output indexing, .to(dtype), progress bar, call options ---------------
def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_same_seed_same_image_whatever_else_is_in_the_batch(pipe):
    alone = pipe([0], generator=gens(5), output_type="pt", progress=False)
    mixed = pipe([3, 0, 7], generator=gens(1, 5, 2), output_type="pt", progress=False)  # CFG on (scale 4)
    assert torch.equal(mixed.codes[1], alone.codes[0])
    torch.testing.assert_close(mixed.images[1], alone.images[0], atol=1e-5, rtol=0)
    assert not torch.equal(mixed.codes[0], mixed.codes[1])
    # one generator: image i is seeded by the generator's i-th draw, so image 0 of [0] and of [0, 1, 2] agree
    one = run(pipe, [0], seed=11, output_type="pt")
    three = run(pipe, [0, 1, 2], seed=11, output_type="pt")
    assert torch.equal(three.codes[0], one.codes[0])
    # and batch_size does not change any image
    by_one = run(pipe, [4, 5, 6, 4], seed=12, output_type="pt", batch_size=1)
    by_four = run(pipe, [4, 5, 6, 4], seed=12, output_type="pt", batch_size=4)
    assert torch.equal(by_one.codes, by_four.codes)
    assert not torch.equal(by_four.codes[0], by_four.codes[3])  # same label, own seed: another image
    with pytest.raises(ValueError, match=r"a list needs one torch.Generator per image \(4 = labels x "
                                         r"num_images_per_label\), got 2"):
        pipe([0, 1], num_images_per_label=2, generator=gens(1, 2), progress=False)
    with pytest.raises(ValueError, match=r"generator=3: must be a torch.Generator"):
        pipe([0], generator=3, progress=False)


def test_output_is_indexable_and_iterable_like_diffusers(pipe):
    out = run(pipe, [1, 2], output_type="pt")
    assert out[0] is out.images and out[1] is out.codes and out["codes"] is out.codes
    images, codes = out
    assert images is out.images and codes is out.codes
    assert len(out.to_tuple()) == 2
    pil = run(pipe, [1], output_type="pil")
    assert pil[0][0].size == (32, 32)  # diffusers' pipe(...)[0][0]: the first image
    with pytest.raises(KeyError, match=r"'image'; valid: \['images', 'codes'\]"):
        out["image"]


def test_to_accepts_a_dtype_like_diffusers():
    torch.manual_seed(0)
    p = MGVQPipeline(MGVQTokenizer.from_preset("mgvq-tiny"), make_generator(), id2label=NAMES)
    ref = run(p, [3], seed=4, output_type="pt")
    assert p.to(torch.bfloat16) is p and p.dtype == torch.bfloat16 and p.device.type == "cpu"
    out = run(p, [3], seed=4, output_type="pt")
    assert out.images.dtype == torch.float32 and out.images.shape == (1, 3, 32, 32)
    assert p.generator.output.weight.dtype == torch.bfloat16 and torch.isfinite(out.images).all()
    assert torch.equal(out.codes[0, 0, 0], ref.codes[0, 0, 0])  # same noise: the first draws agree (then bf16 drifts)
    p.to("cpu", torch.float32)
    assert p.dtype == torch.float32
    assert torch.equal(run(p, [3], seed=4, output_type="pt").codes, ref.codes)
    p.to(device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"not a floating type"):
        p.to(torch.int8)
    with pytest.raises(ValueError, match=r"neither a device"):
        p.to(1.5)
    with pytest.raises(ValueError, match=r"two dtypes"):
        p.to(torch.float32, torch.bfloat16)


def test_cfg_schedule_and_compile_reach_generate(pipe, monkeypatch):
    a = run(pipe, [2], seed=9, output_type="pt")
    lin = run(pipe, [2], seed=9, output_type="pt", cfg_schedule="linear")
    assert not torch.equal(a.codes, lin.codes)  # the schedule changed the guided logits
    import pipelines.pipeline as P

    seen, real = [], P.generate

    def spy(model, labels, **kw):
        seen.append(kw)
        return real(model, labels, **{**kw, "compile": False})  # compiling on 2 CPU cores is not this test's point

    monkeypatch.setattr(P, "generate", spy)
    pipe([2], compile=True, cfg_schedule="linear", progress=False)
    assert seen[-1]["compile"] is True and seen[-1]["cfg_schedule"] == "linear"
    pipe.defaults.cfg_schedule = "linear"
    try:
        pipe([2], progress=False)
    finally:
        pipe.defaults.cfg_schedule = "constant"
    assert seen[-1]["cfg_schedule"] == "linear" and seen[-1]["compile"] is False


def test_progress_bar_can_be_switched_off(pipe, capfd):
    pipe([1], generator=gens(0))
    assert "generate" in capfd.readouterr().err
    pipe([1], generator=gens(0), progress=False)
    assert capfd.readouterr().err == ""
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe([1, 2], batch_size=1, generator=gens(0, 1))
        assert capfd.readouterr().err == ""
    finally:
        pipe.set_progress_bar_config()
    pipe([1, 2], batch_size=1, generator=gens(0, 1))
    assert "sampling" in capfd.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=float("nan")), r"guidance_scale=nan: not a finite number"),
    (dict(guidance_scale=float("inf")), r"guidance_scale=inf: not a finite number"),
    (dict(temperature=float("nan")), r"temperature=nan: not a finite number"),
    (dict(temperature=[1.0, float("inf"), 1.0, 1.0]), r"temperature=inf: not a finite number"),
    (dict(top_p=float("nan")), r"top_p=nan: not a finite number"),
    (dict(top_k=float("nan")), r"top_k=nan: not a finite number"),
    (dict(top_k=2.5), r"top_k=2\.5: not an integer"),
    (dict(top_k="10"), r"top_k='10': must be an integer"),
    (dict(cfg_interval=float("nan")), r"cfg_interval=nan: not a finite number"),
    (dict(cfg_schedule="cosine"), r"cfg_schedule='cosine': valid: 'constant', 'linear'"),
])
def test_non_finite_and_malformed_settings_rejected_before_sampling(pipe, kwargs, match, monkeypatch):
    import pipelines.pipeline as P

    monkeypatch.setattr(P, "generate", lambda *a, **k: pytest.fail("reached the sampler"))
    with pytest.raises(ValueError, match=match):
        pipe([0], progress=False, **kwargs)


def test_generate_takes_one_generator_per_image_for_the_ar_head_too():
    from generator import generate

    torch.manual_seed(0)
    gpt = GPT.from_preset("GPT-tiny", groups=G, codebook_size=K, grid=4, num_classes=10, head="ar").eval()
    for p in gpt.ar_head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    alone = generate(gpt, torch.tensor([2]), guidance_scale=3.0, top_k=[0, 64, 0, 16], generator=gens(5))
    mixed = generate(gpt, torch.tensor([7, 2, 1]), guidance_scale=3.0, top_k=[0, 64, 0, 16], generator=gens(1, 5, 2))
    assert torch.equal(mixed[1], alone[0]) and not torch.equal(mixed[0], mixed[1])
    with pytest.raises(ValueError, match=r"a list needs one torch.Generator per image \(3\), got 2"):
        generate(gpt, torch.tensor([7, 2, 1]), generator=gens(1, 2))
