"""End to end through the CLI: LlamaGen VQ + GPT reference checkpoints -> converters -> pipeline folder -> samples.

The pipeline's greedy CFG samples must be exactly the reference LlamaGen generate() tokens, and its images exactly
the converted tokenizer's decode of those tokens.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines import MGVQPipeline
from pipelines.cli import main as mgvq

from _paths import FIXTURES as FIX


def _state_dict_file(name: str, out: Path, fmt: str) -> Path:
    t = load_file(FIX / f"{name}.safetensors")
    sd = {k[len("state_dict."):]: v.contiguous() for k, v in t.items() if k.startswith("state_dict.")}
    if fmt == "pt":  # the released files are torch pickles with weights under "model"
        path = out / f"{name}.pt"
        torch.save({"model": sd, "steps": 0}, path)
    else:
        path = out / f"{name}.safetensors"
        save_file(sd, path)
    return path


@pytest.fixture(scope="module")
def llamagen_pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("llamagen")
    vq = _state_dict_file("llamagen_vq", d, "pt")
    gpt = _state_dict_file("llamagen_gpt", d, "safetensors")
    assert mgvq(["convert", "--from", "llamagen-vq", str(vq), str(d / "vq"), "image_size=8"]) == 0
    assert mgvq(["convert", "--from", "llamagen-gpt", str(gpt), str(d / "gpt"), "n_head=4", "grid=4"]) == 0
    assert mgvq(["convert", "--from", "pipeline", str(d / "vq"), str(d / "gpt"), str(d / "pipe"),
                 "guidance_scale=2.0", "top_k=1"]) == 0
    return d / "pipe"


def test_pipeline_reproduces_llamagen_greedy_cfg(llamagen_pipeline):
    ref = load_file(FIX / "llamagen_gpt.safetensors")
    pipe = MGVQPipeline.from_pretrained(str(llamagen_pipeline))
    cfg = json.loads((llamagen_pipeline / "pipeline_config.json").read_text())
    assert cfg["sampling_defaults"]["guidance_scale"] == 2.0 and cfg["image_size"] == 8
    labels = ref["gen_labels"].tolist()
    for scale, key in [(2.0, "gen_cfg2_tokens"), (1.0, "gen_cfg1_tokens")]:
        out = pipe(labels, guidance_scale=scale, output_type="pt", progress=False)
        assert out.codes.shape == (2, 4, 4, 1)
        assert torch.equal(out.codes.reshape(2, 16), ref[key]), scale
        with torch.no_grad():
            want = ((pipe.tokenizer.decode(ref[key].view(2, 4, 4, 1)) + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(out.images, want, atol=1e-5, rtol=0)
        assert out.images.shape == (2, 3, 8, 8)


def test_pipeline_names_and_errors(llamagen_pipeline):
    pipe = MGVQPipeline.from_pretrained(str(llamagen_pipeline))
    assert pipe.get_label_ids(["3", "7"]) == [3, 7]
    with pytest.raises(ValueError, match="out of range"):
        pipe([10])
    with pytest.raises(ValueError, match="top_k"):
        pipe([1], top_k=129)


def test_convert_rejects_unknown_kind(capsys):
    assert mgvq(["convert", "--from", "vqgan-taming", "a", "b"]) == 2  # a one-line user error
    assert "valid" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mgvq_pipeline(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mgvq")
    tok_ckpt = _state_dict_file("mgvq_tokenizer", tmp_path, "pt")
    gpt_ckpt = _state_dict_file("mgvq_gpt", tmp_path, "pt")
    assert mgvq(["convert", "--from", "mgvq-tokenizer", str(tok_ckpt), str(tmp_path / "tok"), "image_size=64"]) == 0
    assert mgvq(["convert", "--from", "mgvq-gpt", str(gpt_ckpt), str(tmp_path / "gpt"),
                 "--tokenizer", str(tmp_path / "tok"), "n_head=4", "grid=4"]) == 0
    assert mgvq(["convert", "--from", "pipeline", str(tmp_path / "tok"), str(tmp_path / "gpt"), str(tmp_path / "pipe"),
                 "top_k=1"]) == 0
    return tmp_path / "pipe"


def test_released_mgvq_pair_through_cli(mgvq_pipeline):
    """MGVQ's DC-AE tokenizer + AR-head GPT (reference fixtures) -> pipeline: tokens and decoded images exact."""
    ref = load_file(FIX / "mgvq_gpt.safetensors")
    pipe = MGVQPipeline.from_pretrained(str(mgvq_pipeline))
    assert pipe.generator.config.head == "ar" and pipe.tokenizer.config.groups == 4
    for scale, key in [(2.0, "gen_cfg2"), (1.0, "gen_cfg1")]:
        out = pipe(ref["gen_labels"].tolist(), guidance_scale=scale, output_type="pt", progress=False)
        assert torch.equal(out.codes.reshape(2, 16, 4), ref[f"{key}_tokens"]), scale
        want = ((ref[f"{key}_images"] + 1) / 2).clamp(0, 1)  # the pipeline returns [0, 1] images
        torch.testing.assert_close(out.images, want, atol=1e-4, rtol=1e-4)


def test_compare_llamagen_and_mgvq_in_one_table(llamagen_pipeline, mgvq_pipeline, tmp_path, capsys):
    """`mgvq compare`: same settings/seeds/evaluator for both pipelines, one table; each row equals a separate run."""
    import numpy as np

    from evaluation import metrics as M
    from pipelines import evaluate_generation as S

    inc = M.save_random_inception_weights(tmp_path / "inc.pth", seed=0)
    ref = tmp_path / "ref.npz"
    M.save_npz(ref, np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    common = ["--num-images", "4", "--batch-size", "2", "--guidance-scale", "1.5", "--top-k", "5", "--seed", "3",
              "--ref", str(ref), "--inception-weights", str(inc)]
    assert mgvq(["compare", "--pipeline", f"llamagen={llamagen_pipeline}", "--pipeline", f"mgvq={mgvq_pipeline}",
                 "--out", str(tmp_path / "cmp"), *common]) == 0
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(table["results"]) == ["llamagen", "mgvq"]
    assert table["settings"]["guidance_scale"] == 1.5 and table["settings"]["top_k"] == 5
    printed = capsys.readouterr().out
    assert "llamagen" in printed and "mgvq" in printed and "fid" in printed
    # the row for mgvq equals a stand-alone evaluate-generation run with the same options
    assert S.main(["--pipeline", str(mgvq_pipeline), "--out", str(tmp_path / "solo"), *common]) == 0
    solo = json.loads((tmp_path / "solo" / "metrics.json").read_text())
    row = table["results"]["mgvq"]
    assert row["num_images"] == 4 and row["fid"] == pytest.approx(solo["fid"], rel=1e-6)
    assert row["inception_score"] == pytest.approx(solo["inception_score"], rel=1e-6)
    assert row["sfid"] is not None and row["sfid"] == pytest.approx(solo["sfid"], rel=1e-6)  # from the ref's arr_0
    assert table["results"]["llamagen"]["fid"] != pytest.approx(row["fid"])


def test_mgvq_sample_cli_writes_grid_and_refuses_unwritable_out(llamagen_pipeline, tmp_path):
    assert mgvq(["sample", "--pipeline", str(llamagen_pipeline), "--labels", "1", "2", "--n", "2",
                 "--out", str(tmp_path / "grid.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[0] > 8
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError, match="--out"):  # --debug: the exception itself (without: one line, status 2)
        mgvq(["sample", "--pipeline", str(llamagen_pipeline), "--labels", "1", "--out", str(tmp_path / "a_file" / "x"),
              "--debug"])
