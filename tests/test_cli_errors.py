"""`mgvq` CLI: user errors are one line `mgvq <verb>: error: ...` with exit status 2 (a traceback only with --debug or
MGVQ_DEBUG=1), `mgvq --version`, --dtype / --compile on the sampling verbs."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipelines.cli as cli
from generator import GPT
from pipelines import MGVQPipeline
from pipelines.cli import main as mgvq
from tokenizer import MGVQTokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny").eval()
    gpt = GPT.from_preset("GPT-tiny", groups=4, codebook_size=256, grid=4, num_classes=3, head="parallel")
    d = tmp_path_factory.mktemp("cli") / "pipe"
    MGVQPipeline(tok, gpt.eval(), id2label=["cat", "dog", "bird"]).save_pretrained(d)
    return d


def one_error_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"mgvq {verb}: error: ") and "Traceback" not in err[0]
    return err[0]


def test_version(capsys):
    from importlib.metadata import version

    assert mgvq(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mgvq {version('mgvq')}"


def test_bad_path_is_one_line_and_status_2(capsys, tmp_path):
    rc = mgvq(["sample", "--pipeline", str(tmp_path / "nope"), "--labels", "0", "--out", str(tmp_path / "s.png")])
    assert rc == 2
    line = one_error_line(capsys, "sample")
    assert f"'{tmp_path / 'nope'}' does not exist" in line


def test_bad_label_is_one_line(capsys, pipe_dir, tmp_path):
    rc = mgvq(["sample", "--pipeline", str(pipe_dir), "--labels", "dgo", "--out", str(tmp_path / "s.png")])
    assert rc == 2
    assert "unknown class name 'dgo'. Close matches: ['dog']" in one_error_line(capsys, "sample")
    assert not (tmp_path / "s.png").exists()


def test_non_finite_guidance_is_refused_up_front(capsys, pipe_dir, tmp_path, monkeypatch):
    import pipelines.pipeline as P

    monkeypatch.setattr(P, "generate", lambda *a, **k: pytest.fail("reached the sampler"))
    for bad in ("nan", "inf"):
        rc = mgvq(["sample", "--pipeline", str(pipe_dir), "--labels", "0", "--guidance-scale", bad,
                   "--out", str(tmp_path / "s.png")])
        assert rc == 2
        err = capsys.readouterr().err
        assert f"mgvq sample: error: argument --guidance-scale: '{bad}' is not finite" in err  # argparse's format
    ev = cli.VERBS["evaluate-generation"][0]
    rc = mgvq(["evaluate-generation", "--pipeline", str(pipe_dir), "--num-images", "2", "--guidance-scale", "nan",
               "--out", str(tmp_path / "ev")])
    assert rc == 2, ev
    assert "--guidance-scale=nan is invalid; valid: a finite number >= 0" in one_error_line(capsys,
                                                                                          "evaluate-generation")


def test_raised_systemexit_messages_become_one_line(capsys, tmp_path):
    rc = mgvq(["evaluate-generation", "--out", str(tmp_path / "ev")])  # neither --pipeline nor --samples
    assert rc == 2
    line = one_error_line(capsys, "evaluate-generation")
    assert line == ("mgvq evaluate-generation: error: pass exactly one of --pipeline DIR (sample) or --samples NPZ "
                    "(evaluate)")


@pytest.mark.parametrize("rel", ["pipeline_config.json", "generator/model.safetensors"])
def test_damaged_model_file_is_named(capsys, pipe_dir, tmp_path, rel):
    import shutil

    d = tmp_path / "pipe"
    shutil.copytree(pipe_dir, d)
    f = d / rel
    f.write_bytes(f.read_bytes()[:40])  # truncated
    rc = mgvq(["sample", "--pipeline", str(d), "--labels", "0", "--out", str(tmp_path / "s.png")])
    assert rc == 2
    line = one_error_line(capsys, "sample")
    assert f"{f} is damaged" in line


def test_debug_flag_and_env_show_the_exception(tmp_path, monkeypatch):
    args = ["sample", "--pipeline", str(tmp_path / "nope"), "--labels", "0", "--out", str(tmp_path / "s.png")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mgvq(args + ["--debug"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mgvq(["--debug"] + args)
    monkeypatch.setenv("MGVQ_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mgvq(args)


def test_bugs_keep_their_traceback(monkeypatch):
    mod = importlib.import_module(cli.VERBS["sample"][0])

    def broken(argv):
        raise RuntimeError("a bug")

    monkeypatch.setattr(mod, "main", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        mgvq(["sample"])


def test_real_process_prints_no_traceback_unless_asked(tmp_path):
    cmd = [sys.executable, "-m", "pipelines", "sample", "--pipeline", str(tmp_path / "nope"), "--labels", "0",
           "--out", str(tmp_path / "s.png")]
    env = {k: v for k, v in os.environ.items() if k != "MGVQ_DEBUG"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"mgvq sample: error: pipeline folder '{tmp_path / 'nope'}' does not exist "
                                             f"(hub ids look like 'user/name')"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**env, "MGVQ_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "FileNotFoundError" in r.stderr


def test_sampling_verbs_take_dtype_and_compile(capsys, pipe_dir, tmp_path, monkeypatch):
    import pipelines.pipeline as P

    seen, real = [], P.generate

    def spy(model, labels, **kw):
        seen.append((next(model.parameters()).dtype, kw["compile"]))
        return real(model, labels, **{**kw, "compile": False})  # compiling on 2 CPU cores is not this test's point

    monkeypatch.setattr(P, "generate", spy)
    assert mgvq(["sample", "--pipeline", str(pipe_dir), "--labels", "cat", "bird", "--dtype", "bfloat16",
                 "--compile", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert seen == [(torch.bfloat16, True)]
    assert mgvq(["evaluate-generation", "--pipeline", str(pipe_dir), "--num-images", "2", "--batch-size", "2",
                 "--dtype", "bfloat16", "--compile", "--out", str(tmp_path / "ev")]) == 0
    assert seen[1:] == [(torch.bfloat16, True)]
    assert mgvq(["sample", "--help"]) == 0
    assert "--compile" in capsys.readouterr().out
