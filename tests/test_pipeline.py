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
