"""The README's Python snippets run as written (against a pipeline folder at runs/demo/pipeline)."""
import re
from pathlib import Path

import torch

from generator import GPT
from pipelines import MGVQPipeline
from tokenizer import MGVQTokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_readme_has_two_setup_commands():
    text = README.read_text()
    setup = text.split("## Set up", 1)[1].split("##", 1)[0]
    cmds = [l for l in re.search(r"```bash\n(.*?)```", setup, re.S).group(1).splitlines() if l and not l.startswith("#")]
    assert len(cmds) == 2 and "mgvq demo" in cmds[0] and "pytest" in cmds[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert cmds[1] in ci  # CI runs the README's test command verbatim


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny")
    gen = GPT.from_preset("GPT-tiny", groups=tok.config.groups, codebook_size=tok.config.codebook_size,
                          grid=tok.config.image_size // tok.config.downsample, num_classes=10)
    MGVQPipeline(tok, gen, id2label=FASHION).save_pretrained(str(tmp_path / "runs" / "demo" / "pipeline"))
    monkeypatch.chdir(tmp_path)
    snippets = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(snippets) >= 2
    for code in snippets:
        ns: dict = {}
        exec(compile(code, "README.md", "exec"), ns)
    assert (tmp_path / "sneaker.png").exists()
    assert ns["samples"].shape == (2, 8, 8, tok.config.groups) and ns["coarse"].shape == (2, 3, 32, 32)
