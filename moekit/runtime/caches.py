"""Bound the CPU kernel caches of oneDNN (torch's bf16/fp16 matmuls on CPU).

oneDNN keeps every compiled matmul primitive in a cache keyed by shape (up to 1024 entries,
`ONEDNN_PRIMITIVE_CACHE_CAPACITY`), and torch's ideep layer keeps another one
(`LRU_CACHE_CAPACITY`, also 1024). A MoE layer multiplies each expert's share of the tokens,
M_e = tokens routed to expert e, so nearly every (batch, layer, expert) brings a new shape and
a new entry of roughly 0.1-0.5 MB: measured ~18 MB of RSS per streamed layer (Mixtral-shaped,
hidden 1024, 4 batches x 512 tokens), growing until both caches are full. Compiling a primitive
costs little next to an expert matmul, so the caches are capped at `CAPACITY` entries.

Both variables are read once per process, when the first primitive is made: `bound()` must run
before the first bf16 matmul (`open_model` calls it); a value the user set is kept.
"""

from __future__ import annotations

import os

CAPACITY = "16"
VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound() -> None:
    """Cap both caches at `CAPACITY` entries unless the environment already sets them."""
    for name in VARIABLES:
        os.environ.setdefault(name, CAPACITY)
