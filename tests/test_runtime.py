"""runtime/: the shared run layer (config precedence + renames, pickle-free checkpoints, lock, trackers, grids)."""
import dataclasses
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from runtime.checkpoint import (CheckpointFolder, check_identity, load_optimizer, load_rng, save_optimizer, save_rng,
                                truncate_metrics)
from runtime.config import load_config
from runtime.grid import make_grid, reconstruction_labels
from runtime.guard import NonFiniteGuard, NonFiniteStop
from runtime.metrics import select_trackers
from runtime.outdir import FolderLockedError, RunLock


@dataclasses.dataclass
class Cfg:
    lr: float = 1.0
    steps: int | None = None
    name: str = "a"
    section: dict = dataclasses.field(default_factory=dict)
    RENAMED = {"max_steps": "steps"}


def test_config_precedence_dotted_keys_renames_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-4\nname: yaml\nsection: {a: {b: 1}}\n")
    cfg = load_config(Cfg, y, ["name=cli", "section.a.c=2", "max_steps=5"])
    assert cfg == Cfg(lr=1e-4, steps=5, name="cli", section={"a": {"b": 1, "c": 2}})  # defaults < YAML < key=value
    assert isinstance(load_config(Cfg, None, ["lr=3"]).lr, float)
    with pytest.raises(ValueError, match=r"unknown key\(s\): lrr \(did you mean lr\?\)"):
        load_config(Cfg, None, ["lrr=1"])
    with pytest.raises(ValueError, match="not key=value"):
        load_config(Cfg, None, ["lr"])
    with pytest.raises(ValueError, match="both `max_steps` .* and `steps`"):
        load_config(Cfg, None, ["max_steps=1", "steps=2"])


def test_checkpoint_folder_atomic_rotation_and_pickle_free_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    folder = CheckpointFolder(tmp_path, keep=2)
    for step in (1, 2, 3):
        folder.save(step, lambda d: save_optimizer(d / "opt", opt), {"identity": {"seed": 0}})
    assert [p.name for p in folder.list()] == ["step_00000002", "step_00000003"]
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # torn: no train_state.json -> invisible
    assert folder.resolve("auto").name == "step_00000003" and folder.resolve("none") is None
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.5)
    load_optimizer(folder.latest() / "opt", opt2)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][0][k], b["state"][0][k]) for k in a["state"][0])
    assert not any(f.endswith((".pt", ".pkl", ".bin")) for f in os.listdir(folder.latest()))
    check_identity({"seed": 0}, {"seed": 0}, "x")
    with pytest.raises(ValueError, match="seed differs"):
        check_identity({"seed": 0}, {"seed": 1}, "x")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        folder.resolve(str(tmp_path))


def test_rng_round_trip(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    save_rng(tmp_path / "rng")
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    load_rng(tmp_path / "rng")
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def test_truncate_metrics_drops_lines_past_the_checkpoint_and_torn_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    truncate_metrics(p, 2)
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_nonfinite_guard():
    g = NonFiniteGuard(2, log=lambda m: None)
    g.record(True, 1), g.record(False, 2), g.record(True, 3), g.record(False, 4)
    with pytest.raises(NonFiniteStop, match=r"2 non-finite steps in a row \(max_nonfinite=2\) at steps 4..5"):
        g.record(False, 5, last_checkpoint="ck/step_3")
    assert g.state_dict() == {"skipped_steps": 3, "nonfinite_in_row": 2}


def test_second_process_on_a_locked_folder_refuses_and_a_killed_owner_frees_it(tmp_path):
    code = ("import sys, time; from runtime.outdir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(FolderLockedError, match=rf"in use by a running job \(pid {proc.pid} on"):
        RunLock(tmp_path).acquire()
    proc.kill()
    proc.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead owner's lock
        with pytest.raises(FolderLockedError):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


def test_tracker_selection(monkeypatch):
    import accelerate.utils as au

    assert select_trackers("tensorboard") == ["tensorboard"]
    assert select_trackers("none") == [] and select_trackers(None) == []
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbored'; valid: tensorboard, wandb, mlflow, none"):
        select_trackers("tensorbored")
    monkeypatch.setattr(au, "is_wandb_available", lambda: False)
    with pytest.raises(ValueError, match=r"wandb is not installed \(pip install wandb\); installed: tensorboard"):
        select_trackers("tensorboard,wandb")
    monkeypatch.setattr(au, "is_wandb_available", lambda: True)
    assert select_trackers("tensorboard,wandb") == ["tensorboard", "wandb"]


def test_labelled_grid():
    imgs = np.zeros((6, 8, 8, 3), np.uint8)
    plain = make_grid(imgs, ncol=3, pad=2)
    assert plain.size == (3 * 10 + 2, 2 * 10 + 2)
    labelled = make_grid(imgs, ncol=3, pad=2, row_labels=["T-shirt/top", "Trouser"])
    assert labelled.size[1] == plain.size[1] and labelled.size[0] > plain.size[0]
    margin = np.asarray(labelled)[:, :labelled.size[0] - plain.size[0]]
    assert (margin < 128).any()  # text was drawn
    assert reconstruction_labels(4) == ["original", "first 1 group", "first 2 groups", "first 3 groups",
                                        "all 4 groups"]


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    from runtime.io import atomic_path

    target = tmp_path / "shard.parquet"
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not target.exists()
        with open(tmp, "w") as f:
            f.write("done")
    assert target.read_text() == "done"
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise RuntimeError("writer died")
    assert target.read_text() == "done" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.parquet"]
