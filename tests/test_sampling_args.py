"""--top-k / --top-p / --temperature: one value or one per sub-codebook on `mgvq sample`, `evaluate-generation` and
`compare`, checked before anything is sampled (runtime/cli_args.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import compare as C
from evaluation import metrics as M
from pipelines import evaluate_generation as S
from evaluation.sample import CONFIG_NAME as SAMPLING_CONFIG_NAME
from generator import GPT
from pipelines import MGVQPipeline
from pipelines import sample as mgvq_sample
from runtime.cli_args import check_sampling_args, parse_per_group
from tokenizer import MGVQTokenizer


def _pipeline(path, groups: int, seed: int = 0) -> str:
    torch.manual_seed(seed)
    tok = MGVQTokenizer.from_preset("mgvq-tiny", groups=groups).eval()
    gpt = GPT.from_preset("GPT-tiny", groups=groups, codebook_size=tok.config.codebook_size, grid=4, num_classes=10,
                          head="parallel")
    torch.nn.init.normal_(gpt.output.weight, std=0.5)  # zero-initialised head -> samples depend on settings
    MGVQPipeline(tok, gpt.eval(), id2label=[str(i) for i in range(10)]).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def pipe4(tmp_path_factory):
    return _pipeline(tmp_path_factory.mktemp("p4") / "pipe", groups=4)


@pytest.fixture(scope="module")
def pipe2(tmp_path_factory):
    return _pipeline(tmp_path_factory.mktemp("p2") / "pipe", groups=2, seed=1)


def _direct(pipe_dir, labels, seed, **kw) -> np.ndarray:
    pipe = MGVQPipeline.from_pretrained(pipe_dir)
    # an int: one generator (mgvq sample); a list: one per image (evaluate-generation: image i has seed + i)
    g = [torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list) else torch.Generator().manual_seed(seed)
    x = pipe(labels, generator=g, output_type="pt", progress=False, **kw).images
    return M.nchw_to_nhwc(M.to_uint8(x))


def test_parse_scalar_and_per_group_values():
    assert parse_per_group("top_k", "4096") == 4096 and isinstance(parse_per_group("top_k", "4096"), int)
    assert parse_per_group("top_k", "4096,2048, 0,1") == [4096, 2048, 0, 1]
    assert parse_per_group("top_k", "12.0") == 12
    assert parse_per_group("top_p", "1,0.9") == [1.0, 0.9]
    assert parse_per_group("temperature", "0,1.5") == [0.0, 1.5]


@pytest.mark.parametrize("name,text,match", [
    ("top_k", "-1", "out of range.*integer >= 0"),
    ("top_k", "1.5", "not an integer"),
    ("top_k", "4096,,12", "empty value"),
    ("top_k", "inf", "not finite"),
    ("top_p", "0", r"out of range.*\(0, 1\]"),
    ("top_p", "0.9,1.2", r"'1.2' is out of range"),
    ("top_p", "nan", "not finite"),
    ("temperature", "-0.5", "out of range.*>= 0"),
    ("temperature", "1,inf", "'inf' is not finite"),
    ("temperature", "warm", "not a number"),
])
def test_parse_rejects_bad_values(name, text, match):
    with pytest.raises(ValueError, match=match):
        parse_per_group(name, text)


def test_count_and_codebook_checks():
    check_sampling_args(dict(top_k=[1, 2, 3, 4], top_p=0.9, temperature=None), groups=4, codebook_size=256)
    with pytest.raises(SystemExit, match=r"--top-k 1,2 has 2 values; the pipeline has G=4"):
        check_sampling_args(dict(top_k=[1, 2]), groups=4)
    with pytest.raises(SystemExit, match=r"--temperature .* has 3 values; the pipeline has G=2"):
        check_sampling_args(dict(temperature=[1.0, 1.0, 1.0]), groups=2)
    with pytest.raises(SystemExit, match=r"above the codebook size K=256.*--top-k 12 there is --top-k 4096 here"):
        check_sampling_args(dict(top_k=[4096, 1, 1, 1]), groups=4, codebook_size=256)


def test_mgvq_sample_per_group_values_reach_the_sampler(pipe4, tmp_path):
    args = ["--pipeline", pipe4, "--labels", "3", "7", "--seed", "5"]
    assert mgvq_sample.main(args + ["--top-k", "1,0,1,0", "--temperature", "1,0.7,1,1.3",
                                    "--out", str(tmp_path / "a")]) == 0
    got = np.stack([np.asarray(Image.open(tmp_path / "a" / f"{i:06d}.png").convert("RGB")) for i in range(2)])
    want = _direct(pipe4, [3, 7], 5, top_k=[1, 0, 1, 0], temperature=[1.0, 0.7, 1.0, 1.3])
    np.testing.assert_array_equal(got, want)
    other = _direct(pipe4, [3, 7], 5, top_k=0, temperature=1.0)  # the per-group values changed the samples
    assert not np.array_equal(got, other)


def test_mgvq_sample_refuses_bad_values_before_loading(pipe4, tmp_path, capsys):
    base = ["--pipeline", pipe4, "--labels", "1", "--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit, match=r"--top-k 64,64 has 2 values; the pipeline has G=4"):
        mgvq_sample.main(base + ["--top-k", "64,64"])
    for flag, val, msg in (("--temperature", "-1", "out of range"), ("--top-p", "nan", "not finite"),
                           ("--top-k", "2.5", "not an integer")):
        with pytest.raises(SystemExit) as e:
            mgvq_sample.main(base + [flag, val])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        mgvq_sample.main(base + ["--n", "0"])
    assert e.value.code == 2 and "--n=0 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_evaluate_generation_per_group(pipe4, tmp_path):
    args = ["--pipeline", pipe4, "--num-images", "3", "--batch-size", "3", "--seed", "2", "--top-k", "1,64,64,1",
            "--top-p", "1,0.9,1,1", "--out", str(tmp_path / "e")]
    assert S.main(args) == 0
    saved = json.loads((tmp_path / "e" / SAMPLING_CONFIG_NAME).read_text())
    assert saved["top_k"] == [1, 64, 64, 1] and saved["top_p"] == [1.0, 0.9, 1.0, 1.0]
    with np.load(tmp_path / "e" / "samples.npz") as f:
        arr = f["arr_0"]
    np.testing.assert_array_equal(arr, _direct(pipe4, [0, 1, 2], [2, 3, 4], top_k=[1, 64, 64, 1],
                                                top_p=[1, 0.9, 1, 1]))
    with pytest.raises(SystemExit, match=r"evaluate-generation: --top-p 0.9,0.9,0.9 has 3 values.*G=4"):
        S.main(["--pipeline", pipe4, "--num-images", "3", "--top-p", "0.9,0.9,0.9", "--out", str(tmp_path / "f")])
    assert not (tmp_path / "f").exists()


def test_compare_checks_every_pipeline_before_sampling(pipe4, pipe2, tmp_path):
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit, match=r"compare --pipeline g2=.*--top-k 1,1,1,1 has 4 values; the pipeline has G=2"):
        C.main(["--pipeline", f"g4={pipe4}", "--pipeline", f"g2={pipe2}", "--num-images", "2", "--top-k", "1,1,1,1",
                "--out", str(out)])
    assert not (out / "g4").exists()  # nothing was sampled for the first pipeline either
    assert C.main(["--pipeline", f"g4={pipe4}", "--pipeline", f"g2={pipe2}", "--num-images", "2", "--batch-size", "2",
                   "--temperature", "0", "--out", str(out)]) == 0
    with np.load(out / "g2" / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], _direct(pipe2, [0, 1], 0, temperature=0))
