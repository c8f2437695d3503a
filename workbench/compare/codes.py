"""Groups of rows keyed by tuples of category codes, as one int64 per row.

A group (a question and some factor values) is a mixed-radix number of the columns' category
codes; the key is compressed to the sorted distinct keys whenever its radix would outgrow
int64, and a cell is looked up by the same arithmetic, so millions of rows are grouped with
`np.unique` and `np.bincount` instead of a pandas group-by over strings.
"""

from __future__ import annotations

import numpy as np


class Groups:
    """Respondent groups of one pattern of specified factors: a mixed-radix integer key per
    (question, factor values) of category codes, compressed to sorted distinct keys whenever
    the radix would outgrow int64, so a cell's group is found by the same arithmetic."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.steps: list[np.ndarray | None] = []
        self.uniq = np.zeros(0, dtype=np.int64)
        self.mass = np.zeros((0, 0))
        self.n = np.zeros(0)
        self.n_eff = np.zeros(0)

    def key(self, codes: list[np.ndarray], build: bool = False) -> np.ndarray:
        """The key of each row of codes (all >= 0); -1 where a compressed prefix is unknown."""
        key = codes[0].astype(np.int64)
        missing = np.zeros(len(key), dtype=bool)
        bound = self.sizes[0]
        for i, (c, size) in enumerate(zip(codes[1:], self.sizes[1:], strict=True)):
            key = key * size + c
            bound *= size
            if build:
                self.steps.append(None)
            step = self.steps[i]
            if build and bound > 2**40:
                step, key = np.unique(key, return_inverse=True)
                self.steps[i], key = step, key.reshape(-1)
            elif step is not None:
                key = _lookup(step, key)
                missing |= key < 0
                key = np.maximum(key, 0)
            if step is not None:
                bound = len(step)
        return np.where(missing, -1, key)

    def find(self, codes: list[np.ndarray]) -> np.ndarray:
        """The group of each row of codes (-1: no respondent, or a value the file lacks)."""
        ok = np.all(np.stack(codes) >= 0, axis=0)
        out = np.full(len(ok), -1, dtype=np.int64)
        if ok.any():
            key = self.key([c[ok] for c in codes])
            found = np.full(len(key), -1, dtype=np.int64)
            good = key >= 0
            found[good] = _lookup(self.uniq, key[good])
            out[ok] = found
        return out


def _lookup(sorted_keys: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Position of each key in `sorted_keys` (-1: absent)."""
    if not len(sorted_keys):
        return np.full(len(key), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, key), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == key, pos, -1)
