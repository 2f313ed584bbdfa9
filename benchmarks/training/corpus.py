"""The corpus: the Python standard library's own source files, as bytes (no download needed).

Files are listed in sorted order from ``sysconfig.get_paths()["stdlib"]`` (``*.py``, excluding
``site-packages``), and each goes to the validation split when a hash of its relative path falls
in the first ``val_percent`` of 100 buckets, so the split is by file and the same on every machine
with the same Python version. Token ids are the bytes (vocabulary 256).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # uint8 [n_train]
    val: torch.Tensor  # uint8 [n_val]
    n_files: tuple[int, int]  # (train files, validation files)
    root: str


def _files(root: str) -> list[str]:
    out = []
    for d, subdirs, names in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if s not in ("site-packages", "__pycache__"))
        out += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    return out


def _is_val(rel: str, val_percent: int) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 < val_percent


def load(max_bytes: int = 24 << 20, val_percent: int = 5) -> Corpus:
    """Training and validation bytes, each capped at ``max_bytes`` (in sorted-file order)."""
    root = sysconfig.get_paths()["stdlib"]
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    counts = {False: 0, True: 0}
    for path in _files(root):
        val = _is_val(os.path.relpath(path, root), val_percent)
        if sizes[val] >= max_bytes:
            continue
        with open(path, "rb") as f:
            data = f.read() + b"\n\n"
        parts[val].append(data)
        sizes[val] += len(data)
        counts[val] += 1
    if not parts[True] or not parts[False]:
        raise RuntimeError(f"benchmarks.training: too few standard-library sources under {root}")

    def cat(chunks):
        return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)

    return Corpus(cat(parts[False]), cat(parts[True]), (counts[False], counts[True]), root)


def batches(data: torch.Tensor, batch: int, ctx: int, gen: torch.Generator):
    """Endless random windows: ``(x [batch, ctx], y [batch, ctx])`` int64, y shifted by one."""
    n = data.numel() - ctx - 1
    while True:
        idx = torch.randint(0, n, (batch,), generator=gen)
        w = torch.stack([data[i : i + ctx + 1] for i in idx.tolist()]).long()
        yield w[:, :-1], w[:, 1:]
