"""Shared neighbours of every layer pair of two models, counted in this process: the overlap
counts |N_k(x, f) ∩ N_k(x, g)| summed over prompts, from the stored [n, k] neighbour arrays.

This is the work of one sparse product (each layer a row of an L x n^2 0/1 matrix with a 1
at prompt x n + neighbour), written out by hand because scipy.sparse spends most of that
product elsewhere: at 32 x 42 layers, n = 2048, k = 10 it took 190-210 ms, 40 % of it
transposing B (an n^2-row matrix) and sizing the output, against 60 ms here, with the same
counts (tested). Per block of prompts:

1. each (prompt, neighbour) of the block gets a bitmask of the B layers that hold it (up to
   64 layers at a time; more are counted 64 at a time), in an array small enough for the
   CPU cache;
2. every A layer's (prompt, neighbour) pairs look their masks up;
3. the masks' bytes are tallied per (A layer, byte position, byte value) with one
   ``np.bincount``, and a 256 x 8 table of each byte value's bits turns the tallies into
   counts per (A layer, B layer).
"""

from __future__ import annotations

import numpy as np

MASK_BITS = 64  # B layers per mask word
BLOCK_BYTES = 1 << 20  # a block's masks: within a core's L2 cache (measured best of 0.5-4 MB)
MIN_BLOCK_PROMPTS = 64  # fewer prompts a block would cost more in numpy calls than in cache misses
# BYTE_BITS[v, t]: bit t of byte value v.
BYTE_BITS = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(np.int64)


def shared_neighbours(sets_a: np.ndarray, sets_b: np.ndarray) -> np.ndarray:
    """[La, Lb] counts of (prompt, neighbour) pairs in both layers' sets, from [L, n, k]
    arrays of neighbour positions (rows by prompt position; -1 marks a neighbour an index
    could not find, which matches nothing). A prompt's neighbours must be distinct."""
    la, n, _ = sets_a.shape
    out = np.zeros((la, len(sets_b)), dtype=np.int64)
    step = max(MIN_BLOCK_PROMPTS, BLOCK_BYTES // (8 * n))
    # Tally codes: (A layer, byte position) lanes of 256 byte values each.
    lanes = (np.arange(la, dtype=np.int64)[:, None, None] * 8 + np.arange(8)) * 256
    for first_b in range(0, len(sets_b), MASK_BITS):
        group = sets_b[first_b : first_b + MASK_BITS]
        tally = np.zeros(la * 8 * 256, dtype=np.int64)
        for start in range(0, n, step):
            stop = min(n, start + step)
            rows = (np.arange(stop - start, dtype=np.int64) * n)[:, None]  # the block's prompts' offsets
            masks = np.zeros((stop - start) * n, dtype=np.uint64)
            for bit, layer in enumerate(group):
                found = layer[start:stop]
                masks[(rows + found)[found >= 0]] |= np.uint64(1 << bit)
            block_a = sets_a[:, start:stop]
            looked_up = masks[rows + np.maximum(block_a, 0)]
            looked_up[block_a < 0] = 0
            # Little-endian words: byte t holds B layers 8t to 8t + 7.
            by_byte = looked_up.astype("<u8", copy=False).reshape(la, -1).view(np.uint8).reshape(la, -1, 8)
            tally += np.bincount((lanes + by_byte).ravel(), minlength=tally.size)
        counts = (tally.reshape(la, 8, 256) @ BYTE_BITS).reshape(la, 64)
        out[:, first_b : first_b + len(group)] = counts[:, : len(group)]
    return out
