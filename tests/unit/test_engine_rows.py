"""The packed path's row bookkeeping, checked against direct formulations (no model).

`packed_mask` builds every row's attention pattern with broadcasting; the reference here is
the position-by-position definition. `_common_prefix` takes the lexicographic extremes; the
reference compares every sequence at every position. `long_lived_frozen` hides the objects
alive on entry from the garbage collector for the duration of a run and only then.
"""

from __future__ import annotations

import random

import torch

from workbench.engine.packing import PackedRow, pack_request, packed_mask
from workbench.engine.scoring import _common_prefix


def _reference_mask(rows: list[PackedRow], prefix_lengths: list[int], width: int) -> torch.Tensor:
    n_prefix = max(prefix_lengths)
    allowed = torch.zeros((len(rows), width, n_prefix + width), dtype=torch.bool)
    for b, row in enumerate(rows):
        n, c = len(row.tokens), row.n_context
        for i in range(width):
            if i >= n:  # a pad sees only itself
                allowed[b, i, n_prefix + i] = True
                continue
            allowed[b, i, : prefix_lengths[b]] = True
            if i < c:  # context: causal over the context
                allowed[b, i, n_prefix : n_prefix + i + 1] = True
            else:  # a tree token: its parent's view and itself
                allowed[b, i, n_prefix:] = allowed[b, row.parents[i - c], n_prefix:]
                allowed[b, i, n_prefix + i] = True
    return allowed[:, None]


def test_packed_mask_matches_the_definition() -> None:
    rng = random.Random(0)
    for _ in range(20):
        rows, lengths = [], []
        for ri in range(rng.randint(1, 6)):
            suffix = [rng.randrange(50) for _ in range(rng.randint(1, 7))]
            conts = [
                tuple(rng.randrange(50) for _ in range(rng.randint(1, 3)))
                for _ in range(rng.randint(1, 4))
            ]
            rows.append(pack_request(ri, ri, suffix, conts))
            lengths.append(rng.randint(0, 5))
        width = max(len(r.tokens) for r in rows) + rng.randint(0, 2)
        got = packed_mask(rows, lengths, width)
        assert got.dtype == torch.bool
        assert torch.equal(got, _reference_mask(rows, lengths, width))
        assert got[:, 0].any(-1).all()  # no query position is fully masked


def test_common_prefix_matches_a_position_by_position_scan() -> None:
    rng = random.Random(1)
    for _ in range(200):
        head = [rng.randrange(4) for _ in range(rng.randint(0, 6))]
        seqs = [
            tuple(head + [rng.randrange(4) for _ in range(rng.randint(0, 4))])
            for _ in range(rng.randint(1, 5))
        ]
        n = min(map(len, seqs))
        expected = next((i for i in range(n) if len({s[i] for s in seqs}) > 1), n)
        assert _common_prefix(seqs) == expected
    assert _common_prefix([[1, 2, 3], (1, 2, 4)]) == 2  # lists and tuples mixed
