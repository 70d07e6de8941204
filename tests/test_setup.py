"""The README's two set-up commands: what they do on a fresh Debian/Ubuntu machine, and that CI runs exactly them.

The commands and .ci/run are executed for real by a shell, with stand-ins for apt-get, sudo, pip, mgvq and python on an
otherwise empty PATH that log how they were called (nothing is installed, nothing leaves the machine). The real
Debian package is checked against the demo's data lookup when it is installed.
"""
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APT = "$(command -v sudo) apt-get update -qq && $(command -v sudo) apt-get install -y -qq dataset-fashion-mnist && "
PIP = "pip install torch==2.14.1 torchvision==0.29.1 "


def setup_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_commands_install_the_data_themselves_and_ci_runs_them_verbatim():
    cmds = setup_commands()
    assert cmds == [APT + PIP + "-e . && mgvq demo --out runs/demo",
                    APT + PIP + '-e ".[dev]" && python -m pytest -q']
    ci = [line.strip() for line in ROOT.joinpath(".ci", "run").read_text().splitlines()]
    code = [line for line in ci if line and not line.startswith("#")]
    i, j = code.index(cmds[0]), code.index(cmds[1])  # whole lines, not a substring of something else
    assert code.index(". .venv/bin/activate") < i < j
    for k in (i, j):  # set -e does not stop inside an && list: every command's status is checked right after it
        assert code[k + 1].startswith("[ $? -eq 0 ] || {") and "exit 1" in code[k + 1]
    readme = ROOT.joinpath("README.md").read_text()
    assert "**Other systems:** leave out the two `apt-get` commands" in readme


def _stubs(tmp_path: Path, sudo: bool) -> Path:
    """A PATH folder holding only stand-ins (and dirname/mkdir for .ci/run): each logs '<name> <args>' to $LOG."""
    d = tmp_path / ("bin_sudo" if sudo else "bin_root")
    d.mkdir()
    bash = shutil.which("bash")
    scripts = {
        "apt-get": 'if [ "$1" = update ] && [ -n "${FAIL_APT_UPDATE:-}" ]; then echo "E: lists" >&2; exit 100; fi',
        "pip": "",
        "mgvq": "",
        "python": "",
        "python3": 'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && : > "$3/bin/activate"; fi',
    }
    if sudo:
        scripts["sudo"] = 'exec "$@"'
    for name, body in scripts.items():
        p = d / name
        p.write_text(f'#!{bash}\necho "${{0##*/}} $*" >> "$LOG"\n{body}\n')
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    for tool in ("dirname", "mkdir"):
        (d / tool).symlink_to(shutil.which(tool))
    return d


def _run(shell: str, script_or_cmd: str, path: Path, tmp_path: Path, *, file=False, **env) -> tuple[int, list[str]]:
    log = tmp_path / f"log_{len(list(tmp_path.glob('log_*')))}"
    log.touch()
    args = [shutil.which(shell), script_or_cmd] if file else [shutil.which(shell), "-c", script_or_cmd]
    r = subprocess.run(args, env={"PATH": str(path), "LOG": str(log), **env}, cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    return r.returncode, log.read_text().splitlines()


APT_CALLS = ["apt-get update -qq", "apt-get install -y -qq dataset-fashion-mnist"]


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_readme_commands_as_root_without_sudo_and_as_a_user_with_sudo(tmp_path, shell):
    demo, tests = setup_commands()
    root = _stubs(tmp_path, sudo=False)  # root on a fresh machine: no sudo installed
    assert _run(shell, demo, root, tmp_path) == (0, APT_CALLS + [
        "pip install torch==2.14.1 torchvision==0.29.1 -e .", "mgvq demo --out runs/demo"])
    assert _run(shell, tests, root, tmp_path) == (0, APT_CALLS + [
        "pip install torch==2.14.1 torchvision==0.29.1 -e .[dev]", "python -m pytest -q"])
    user = _stubs(tmp_path, sudo=True)  # a user with sudo: apt-get through sudo, pip and the rest as the user
    rc, calls = _run(shell, demo, user, tmp_path)
    assert rc == 0 and calls == ["sudo apt-get update -qq", "apt-get update -qq",
                                 "sudo apt-get install -y -qq dataset-fashion-mnist",
                                 "apt-get install -y -qq dataset-fashion-mnist",
                                 "pip install torch==2.14.1 torchvision==0.29.1 -e .", "mgvq demo --out runs/demo"]
    # apt's lists cannot be refreshed: the command stops there, nothing else runs
    rc, calls = _run(shell, demo, root, tmp_path, FAIL_APT_UPDATE="1")
    assert rc == 100 and calls == ["apt-get update -qq"]


def test_ci_script_runs_both_commands_and_fails_when_one_fails(tmp_path):
    repo = tmp_path / "clone"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    root = _stubs(tmp_path, sudo=False)
    rc, calls = _run("bash", str(repo / ".ci" / "run"), root, tmp_path, file=True)
    assert rc == 0 and calls == ["python3 -m venv .venv"] + APT_CALLS + [
        "pip install torch==2.14.1 torchvision==0.29.1 -e .", "mgvq demo --out runs/demo"] + APT_CALLS + [
        "pip install torch==2.14.1 torchvision==0.29.1 -e .[dev]", "python -m pytest -q"]
    rc, calls = _run("bash", str(repo / ".ci" / "run"), root, tmp_path, file=True, FAIL_APT_UPDATE="1")
    assert rc == 1 and calls == ["python3 -m venv .venv", "apt-get update -qq"]  # not on to the tests


def test_the_demo_finds_what_the_debian_package_installs(tmp_path, monkeypatch):
    """After command 1's apt-get on a fresh machine (no --data-dir, empty cache) the demo reads the package's files
    and downloads nothing."""
    dpkg = shutil.which("dpkg-query")
    listed = subprocess.run([dpkg, "-L", "dataset-fashion-mnist"], capture_output=True, text=True) if dpkg else None
    if listed is None or listed.returncode != 0:
        pytest.skip("Debian package dataset-fashion-mnist not installed here (README command 1 installs it)")
    files = {Path(p) for p in listed.stdout.split()}
    from pipelines.demo import find_data

    monkeypatch.setenv("MGVQ_DATA_DIR", str(tmp_path / "empty-cache"))
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("the demo tried to download"))
    found = find_data(None)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert found / f"{stem}.gz" in files
    assert os.access(found / "train-images-idx3-ubyte.gz", os.R_OK)
