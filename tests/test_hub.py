"""Model folders and the hub: MGVQTokenizer / GPT / MGVQPipeline save_pretrained (same layout + a model card),
push_to_hub and hub-id from_pretrained against a fake hub (HfApi's create_repo / upload_folder replaced by a copy
into a local hub cache, which the real snapshot_download then reads with local_files_only), damaged files."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from generator import GPT
from pipelines import MGVQPipeline
from runtime.hub import DamagedFileError
from tokenizer import MGVQTokenizer

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
METRICS = {"num_images": 500, "fid": 12.345, "inception_score": 3.21, "settings": {"guidance_scale": 2.0}}


def tiny_pipe() -> MGVQPipeline:
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny").eval()
    gpt = GPT.from_preset("GPT-tiny", groups=4, codebook_size=256, grid=4, num_classes=10, head="parallel")
    torch.nn.init.normal_(gpt.output.weight, std=0.5)
    return MGVQPipeline(tok, gpt.eval(), id2label=NAMES, sampling_defaults={"guidance_scale": 2.5, "top_k": 64})


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


def sample(p, labels=(0, 7), seed=3):
    return p(list(labels), generator=torch.Generator().manual_seed(seed), output_type="pt", progress=False)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- a fake hub: create_repo / upload_folder write a hub-cache snapshot; snapshot_download reads it -----------------
class FakeHub:
    def __init__(self, cache: Path):
        self.cache, self.pushes = cache, []

    def create_repo(self, api, repo_id, *, private=None, exist_ok=False, **kw):
        self.pushes.append({"create": repo_id, "private": private})
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, api, *, repo_id, folder_path, commit_message=None, **kw):
        files = sorted(p for p in Path(folder_path).rglob("*") if p.is_file())
        sha = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
        repo = self.cache / ("models--" + repo_id.replace("/", "--"))
        snap = repo / "snapshots" / sha
        shutil.copytree(folder_path, snap)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        self.pushes.append({"repo": repo_id, "files": [str(p.relative_to(folder_path)) for p in files],
                            "message": commit_message})
        return f"https://huggingface.co/{repo_id}/commit/{sha}"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **kw: hub.upload_folder(api, **kw))
    return hub


# ---- local folders ---------------------------------------------------------------------------------------------------
def test_folder_layout_kept_and_old_folders_load(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    assert sorted(os.listdir(tmp_path / "p")) == ["README.md", "generator", "pipeline_config.json", "tokenizer"]
    for sub, model in (("tokenizer", pipe.tokenizer), ("generator", pipe.generator)):
        assert sorted(os.listdir(tmp_path / "p" / sub)) == ["README.md", "config.json", "model.safetensors"]
        cfg = json.loads((tmp_path / "p" / sub / "config.json").read_text())
        assert cfg["groups"] == 4 and cfg["codebook_size"] == 256  # the same flat JSON config as before
    # a folder written before the model cards existed (no README.md) loads, and gives the same images
    for readme in (tmp_path / "p").rglob("README.md"):
        readme.unlink()
    loaded = MGVQPipeline.from_pretrained(str(tmp_path / "p"))
    assert torch.equal(sample(loaded).codes, sample(pipe).codes)
    assert same_weights(loaded.tokenizer, pipe.tokenizer) and same_weights(loaded.generator, pipe.generator)


def test_model_cards_describe_the_models(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p", metrics=METRICS)
    card = (tmp_path / "p" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: mgvq" in card
    assert "layout G x K = 4 x 256, C = 32" in card and "vqgan" in card  # tokenizer layout + backbone
    assert "GPT 2 layers x 4 heads x 64" in card
    assert "10: T-shirt/top, Trouser, Pullover" in card and "Ankle boot" in card  # classes
    assert "guidance_scale=2.5" in card and "top_k=64" in card  # sampling defaults
    assert "| fid | 12.35 |" in card and "| num_images | 500 |" in card  # the measured metrics
    assert f"MGVQPipeline.from_pretrained({str(tmp_path / 'p')!r})" in card  # usage snippet
    assert json.loads((tmp_path / "p" / "metrics.json").read_text()) == METRICS
    assert MGVQPipeline.from_pretrained(str(tmp_path / "p")).metrics == METRICS
    tok_card = (tmp_path / "p" / "tokenizer" / "README.md").read_text()
    assert "| layout G x K | 4 x 256 |" in tok_card and "| latent channels C | 32 |" in tok_card
    assert "| backbone | vqgan |" in tok_card
    gpt_card = (tmp_path / "p" / "generator" / "README.md").read_text()
    assert "| classes | 10 |" in gpt_card and "| layers x heads x dim | 2 x 4 x 64 |" in gpt_card
    # metrics from a metrics.json next to the run (the path), and re-saving keeps them (card regenerated)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"fid": 7.5}))
    pipe.save_pretrained(tmp_path / "q", metrics=tmp_path / "eval" / "metrics.json")
    assert "| fid | 7.5 |" in (tmp_path / "q" / "README.md").read_text()
    pipe.save_pretrained(tmp_path / "q")
    assert "| fid | 7.5 |" in (tmp_path / "q" / "README.md").read_text()
    # a hand-edited card (marker line removed) is kept
    (tmp_path / "q" / "README.md").write_text("# my card\n")
    pipe.save_pretrained(tmp_path / "q")
    assert (tmp_path / "q" / "README.md").read_text() == "# my card\n"


# ---- hub round trips -------------------------------------------------------------------------------------------------
def test_pipeline_push_to_hub_and_load_by_hub_id(pipe, fake_hub):
    url = pipe.push_to_hub("user/mgvq-tiny", metrics=METRICS, private=True)
    assert url.startswith("https://huggingface.co/user/mgvq-tiny/commit/")
    assert fake_hub.pushes[0] == {"create": "user/mgvq-tiny", "private": True}
    pushed = set(fake_hub.pushes[1]["files"])
    assert {"README.md", "metrics.json", "pipeline_config.json", "tokenizer/config.json", "tokenizer/model.safetensors",
            "generator/config.json", "generator/model.safetensors"} <= pushed
    assert "config.json" not in pushed  # no root config.json beside pipeline_config.json
    loaded = MGVQPipeline.from_pretrained("user/mgvq-tiny", cache_dir=str(fake_hub.cache), local_files_only=True)
    assert torch.equal(sample(loaded).codes, sample(pipe).codes)
    assert loaded.id2label == pipe.id2label and loaded.defaults == pipe.defaults and loaded.metrics == METRICS
    snap = next((fake_hub.cache / "models--user--mgvq-tiny" / "snapshots").iterdir())
    card = (snap / "README.md").read_text()
    assert "MGVQPipeline.from_pretrained('user/mgvq-tiny')" in card and "| fid | 12.35 |" in card
    assert pipe.metrics is None  # push_to_hub(metrics=...) did not change the pipeline


def test_tokenizer_and_gpt_push_and_load_by_hub_id(pipe, fake_hub):
    pipe.tokenizer.push_to_hub("user/tok")
    pipe.generator.push_to_hub("user/gpt", metrics={"val_loss": 4.2})
    tok = MGVQTokenizer.from_pretrained("user/tok", cache_dir=str(fake_hub.cache), local_files_only=True)
    gpt = GPT.from_pretrained("user/gpt", cache_dir=str(fake_hub.cache), local_files_only=True)
    assert same_weights(tok, pipe.tokenizer) and tok.config == pipe.tokenizer.config
    assert same_weights(gpt, pipe.generator) and gpt.config == pipe.generator.config
    assert gpt.metrics == {"val_loss": 4.2}
    snap = next((fake_hub.cache / "models--user--tok" / "snapshots").iterdir())
    assert "MGVQTokenizer.from_pretrained('user/tok')" in (snap / "README.md").read_text()


def test_hub_ids_go_to_snapshot_download_with_hub_arguments(pipe, tmp_path, monkeypatch):
    pipe.generator.save_pretrained(tmp_path / "g")
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(tmp_path / "g")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    gpt = GPT.from_pretrained("user/gpt", revision="v1", token="hf_x")
    assert same_weights(gpt, pipe.generator)
    assert calls[0][0] == "user/gpt" and calls[0][1]["revision"] == "v1" and calls[0][1]["token"] == "hf_x"
    assert "model.safetensors" in calls[0][1]["allow_patterns"]

    def unreachable(repo_id, **kw):
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    for load in (GPT.from_pretrained, MGVQTokenizer.from_pretrained, MGVQPipeline.from_pretrained):
        with pytest.raises(FileNotFoundError, match=r"'user/x' is neither a local folder nor a downloadable hub "
                                                    r"repo \(OSError: no route to host\)"):
            load("user/x")
    with pytest.raises(FileNotFoundError, match=r"does not exist \(hub ids look like 'user/name'\)"):
        GPT.from_pretrained(str(tmp_path / "missing"))


# ---- damaged files ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["pipeline_config.json", "tokenizer/config.json", "generator/config.json",
                                 "tokenizer/model.safetensors", "generator/model.safetensors"])
def test_damaged_files_are_named(pipe, tmp_path, rel):
    pipe.save_pretrained(tmp_path / "p")
    f = tmp_path / "p" / rel
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated (an interrupted copy or download)
    with pytest.raises(DamagedFileError, match=rf"{f} is damaged: not a readable safetensors file|{f} is damaged: "
                                              rf"not valid JSON") as e:
        MGVQPipeline.from_pretrained(str(tmp_path / "p"))
    assert "download it again" in str(e.value)
    assert isinstance(e.value, ValueError)  # the CLI reports it as a one-line user error
