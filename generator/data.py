"""Stage-two data: a map-style dataset over the code shards written by `tokenizer.cache_codes`.

A shard directory holds `meta.json` plus Parquet shards (HF `datasets` schema) with the columns
`codes` (V, h, w, G) small-int sub-token indices of V augmented views, `label` (ClassLabel) and `index`.
Each item is one view of one image: `(codes (h, w, G) int64, label int64)`; for a text-conditional GPT
(conditioning="text") `(codes, caption features (T, D) float32, mask (T,) bool)`, the features read from the shards'
`caption_features` / `caption_length` columns and left-padded to T (LlamaGen's layout). The shards are read through
`datasets` (Arrow, memory-mapped), so nothing is loaded into RAM up front.

This module reads only the shards and meta.json; it never imports `tokenizer`.

    ds = CodeShardDataset("shards/fmnist-train", groups=4, codebook_size=256, grid=8)
    loader = build_loader(ds, batch_size=64, num_workers=2)            # with accelerate: accelerator.prepare(loader)
    loader = build_loader(ds, batch_size=64, distributed=True)         # plain torch.distributed: DistributedSampler
    for epoch in range(E):
        set_epoch(loader, epoch)                                       # new shuffle and (with seed=) new views
        for codes, labels in loader: ...
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

META_NAME = "meta.json"
FORMAT_NAME = "mgvq-codes"


def read_meta(path: str) -> dict:
    """Read and sanity-check `meta.json` of a shard directory; raises if missing or the run is unfinished."""
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{meta_path} not found: {path!r} is not a code-shard directory "
            "(make one with `mgvq cache-codes --tokenizer DIR --data DATA --out {path}`)"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{meta_path}: format={meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if not meta.get("complete", False):
        raise ValueError(
            f"{meta_path}: complete=false, the cache-codes run that writes {path!r} has not finished "
            "(run the same command again: it resumes and skips the shards already written)"
        )
    return meta


def _config_values(config: Any, groups, codebook_size, grid):
    """Pull (G, K, grid) out of a GPTConfig-like object, explicit values winning."""
    if config is not None:
        groups = getattr(config, "groups", None) if groups is None else groups
        codebook_size = getattr(config, "codebook_size", None) if codebook_size is None else codebook_size
        if grid is None:
            grid = getattr(config, "grid", None)
            if grid is None and getattr(config, "block_size", None) is not None:  # LlamaGen-style L = grid**2
                side = int(round(config.block_size ** 0.5))
                grid = side if side * side == config.block_size else None
    return groups, codebook_size, grid


def _as_hw(grid) -> tuple[int, int] | None:
    if grid is None:
        return None
    if isinstance(grid, int):
        return (grid, grid)
    hw = tuple(int(g) for g in grid)
    if len(hw) != 2:
        raise ValueError(f"grid={grid!r}: expected an int or (h, w)")
    return hw


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-mixed integer hash (uint64 in, uint64 out)."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


class CodeShardDataset(Dataset):
    """One random (or fixed) augmented view of one image per item: `(codes (h, w, G) int64, label int64)`.

    path: shard directory written by `tokenizer.cache_codes` (meta.json + Parquet shards).
    groups / codebook_size / grid: the generator's G, K and token grid (int or (h, w)); each one given must
        match meta.json, else ValueError naming both values. `config=` takes a GPTConfig-like object instead.
    view: "random" (a new view per item per epoch) or an int in [0, V) for a fixed view (e.g. 0 = centre crop).
    seed: None draws random views from torch's RNG (DataLoader workers are re-seeded every epoch, so views
        change per epoch with no plumbing; reproducible under torch.manual_seed). An int makes the view a pure
        function of (seed, epoch, index); advance the epoch with `set_epoch` (or the module-level helper).
    cache_dir: where `datasets` keeps its Arrow copy of the Parquet shards (default: the HF cache).
    """

    def __init__(self, path: str, groups: int | None = None, codebook_size: int | None = None, grid=None,
                 view: str | int = "random", seed: int | None = None, config: Any = None,
                 cache_dir: str | None = None, conditioning: str | None = None, caption_tokens: int | None = None):
        self.path = path
        self._meta = read_meta(path)
        m = self._meta
        self.conditioning = conditioning or getattr(config, "conditioning", None) or "class"
        if self.conditioning not in ("class", "text"):
            raise ValueError(f"conditioning={self.conditioning!r}: valid: 'class', 'text'")
        if self.conditioning == "text":
            feat = (m.get("captions") or {}).get("features")
            if not feat:
                raise ValueError(f"{path!r} holds no caption features (meta.json captions.features); a text-"
                                 f"conditional GPT trains on shards written with captions and a caption encoder "
                                 f"(mgvq cache-codes --caption-column/--caption-sidecar --caption-encoder T5)")
            T = caption_tokens or getattr(config, "caption_tokens", None) or feat["max_length"]
            want_dim = getattr(config, "caption_dim", None)
            if want_dim is not None and want_dim != feat["dim"]:
                raise ValueError(f"caption_dim mismatch: the generator expects {want_dim} but the caption features in "
                                 f"{path!r} have {feat['dim']} ({feat.get('encoder')})")
            if T < feat["max_length"]:
                raise ValueError(f"caption_tokens={T} is shorter than the shards' caption encoder max_length="
                                 f"{feat['max_length']}")
            self.caption_tokens, self.caption_dim = int(T), int(feat["dim"])
        groups, codebook_size, grid = _config_values(config, groups, codebook_size, grid)
        for name, want, have in (("groups (G)", groups, m["groups"]),
                                 ("codebook_size (K)", codebook_size, m["codebook_size"]),
                                 ("grid (h, w)", _as_hw(grid), tuple(m["grid"]))):
            if want is not None and want != have:
                raise ValueError(f"{name} mismatch: the generator expects {want} but the shards in {path!r} "
                                 f"have {have} (meta.json); re-cache with the matching tokenizer or fix the config")
        num_classes = getattr(config, "num_classes", None)
        if num_classes is not None and num_classes < m["num_classes"]:
            raise ValueError(f"num_classes mismatch: the generator has {num_classes} classes but the shards in "
                             f"{path!r} have {m['num_classes']} (meta.json class_names)")
        self.num_views = int(m["views"]["count"])
        if isinstance(view, str):
            if view != "random":
                raise ValueError(f"view={view!r}: expected 'random' or an int in [0, {self.num_views})")
        elif not (isinstance(view, (int, np.integer)) and 0 <= view < self.num_views):
            raise ValueError(f"view={view!r}: expected 'random' or an int in [0, {self.num_views}) "
                             f"(views: {m['views']['names']})")
        self.view, self.seed, self.epoch = view, seed, 0

        import datasets  # lazy: importing `datasets` costs ~1 s

        files = [os.path.join(path, f) for f in m["shards"]]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in meta.json are missing, e.g. {missing[0]}")
        if not files:
            raise ValueError(f"{path!r}: meta.json lists no shards (counts: {m.get('counts')})")
        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            ds = datasets.Dataset.from_parquet(files, cache_dir=cache_dir, keep_in_memory=False)
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        shape = tuple(ds.features["codes"].shape)
        expect = (self.num_views, *m["grid"], m["groups"])
        if shape != expect:
            raise ValueError(f"{path!r}: codes column shape {shape} disagrees with meta.json {expect}")
        if len(ds) != m["counts"]["written"]:
            raise ValueError(f"{path!r}: shards hold {len(ds)} rows but meta.json counts.written="
                             f"{m['counts']['written']}")
        cols = ["codes", "label"] if self.conditioning == "class" else ["codes", "caption_features", "caption_length"]
        self._ds = ds.with_format("numpy", columns=cols)

    @property
    def meta(self) -> dict:
        return self._meta

    @property
    def class_names(self) -> list[str]:
        return list(self._meta["class_names"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def captions(self, indices) -> list[str]:
        """The stored caption strings of items `indices` (shards written with captions)."""
        if "caption" not in self._ds.column_names:
            raise ValueError(f"{self.path!r}: the shards hold no captions")
        return [str(c) for c in self._ds.with_format(None).select(list(indices))["caption"]]

    def __len__(self) -> int:
        return len(self._ds)

    def _views(self, idx: np.ndarray) -> np.ndarray:
        n = len(idx)
        if not isinstance(self.view, str):
            return np.full(n, int(self.view))
        if self.seed is None:
            return torch.randint(self.num_views, (n,)).numpy()
        base = np.uint64((self.seed * 0x9E3779B97F4A7C15 + self.epoch) % 2 ** 64)
        with np.errstate(over="ignore"):
            key = _mix(base + _mix(idx.astype(np.uint64) + np.uint64(1)))
        return (key % np.uint64(self.num_views)).astype(np.int64)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batched fetch (the DataLoader uses it when present): one Arrow read for the whole batch."""
        idx = np.asarray(indices, dtype=np.int64)
        batch = self._ds[idx]
        codes = batch["codes"][np.arange(len(idx)), self._views(idx)]  # (B, h, w, G)
        codes = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64))
        if self.conditioning == "text":  # left-pad each caption's n valid rows to (T, D)
            T, n = self.caption_tokens, np.asarray(batch["caption_length"], dtype=np.int64)
            feats = np.zeros((len(idx), T, self.caption_dim), np.float32)
            for b, rows in enumerate(batch["caption_features"]):
                if n[b]:
                    feats[b, T - n[b]:] = np.asarray(rows, dtype=np.float32).reshape(n[b], self.caption_dim)
            mask = torch.from_numpy(np.arange(T)[None] >= (T - n)[:, None])
            return list(zip(codes.unbind(0), torch.from_numpy(feats).unbind(0), mask.unbind(0)))
        labels = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))
        return list(zip(codes.unbind(0), labels.unbind(0)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return self.__getitems__([i % n])[0]


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, num_workers: int = 0,
                 drop_last: bool = True, seed: int = 0, distributed: bool = False,
                 pin_memory: bool = False) -> DataLoader:
    """The one place where distributed sampling is decided. `batch_size` is per process.

    distributed=False: a plain (shuffled) DataLoader. Under accelerate, pass it to `accelerator.prepare`,
        which shards it across processes; do not also ask for a DistributedSampler.
    distributed=True: plain torch.distributed (torchrun without accelerate): a DistributedSampler over the
        initialised process group, so each rank sees a disjoint 1/world slice per epoch.
    Call `set_epoch(loader, epoch)` each epoch to reshuffle (and to advance seeded views).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("build_loader(distributed=True) needs an initialised torch.distributed process "
                               "group (torchrun + init_process_group); under accelerate use distributed=False "
                               "and accelerator.prepare(loader)")
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          drop_last=drop_last, pin_memory=pin_memory, persistent_workers=False)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=pin_memory, persistent_workers=False)


def set_epoch(loader, epoch: int) -> None:
    """Advance the epoch everywhere it matters: the sampler (DistributedSampler or accelerate's) and the dataset."""
    if hasattr(loader, "set_epoch"):  # accelerate's prepared loaders
        loader.set_epoch(epoch)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    ds = getattr(loader, "dataset", None)
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)
