"""Random byte edits of valid messages, for differential tests of parsers."""

from __future__ import annotations

import random

__all__ = ["mutated"]


def mutated(rng: random.Random, message: bytes, alphabet: bytes) -> bytes:
    """C{message} with one to three bytes replaced, inserted (from C{alphabet}) or deleted."""
    data = bytearray(message)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data))
        op = rng.random()
        if op < 0.4:
            data[at] = rng.choice(alphabet)
        elif op < 0.7:
            data.insert(at, rng.choice(alphabet))
        else:
            del data[at]
    return bytes(data)
