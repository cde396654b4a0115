"""A tiny character-level corpus shipped as a string, and deterministic batches of it."""

from __future__ import annotations

import numpy as np

# Short, repetitive English: a few dozen steps of a tiny model learn its bigrams.
CORPUS = (
    "the quick brown fox jumps over the lazy dog. "
    "a lookup table that gets updated by gradient descent. "
    "the embedding maps each token id to a row of the table, "
    "and the tied output projection maps each hidden state back to the vocabulary. "
    "pack my box with five dozen liquor jugs! "
    "how vexingly quick daft zebras jump; "
    "sphinx of black quartz, judge my vow? "
) * 4

VOCAB_SIZE = 64  # Room to spare: the corpus uses fewer distinct characters.
CHARS = "".join(sorted(set(CORPUS)))
assert len(CHARS) <= VOCAB_SIZE, len(CHARS)


def encode(text: str) -> np.ndarray:
    """Character ids, ``int32``: the index of each character in ``CHARS``."""
    index = {c: i for i, c in enumerate(CHARS)}
    return np.asarray([index[c] for c in text], np.int32)


def decode(ids) -> str:
    return "".join(CHARS[int(i)] if int(i) < len(CHARS) else "?" for i in ids)


def batches(batch_size: int, seq_len: int, *, seed: int = 0):
    """Endless ``(inputs, targets)`` of shape ``[batch_size, seq_len]``; targets shift by one.

    Windows start at positions drawn by a seeded NumPy generator, so every run sees the
    same batches.
    """
    ids = encode(CORPUS)
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, ids.size - seq_len - 1, batch_size)
        window = np.stack([ids[s : s + seq_len + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]
