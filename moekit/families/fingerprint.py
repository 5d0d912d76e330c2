"""A short identity of a checkpoint, to tell whether statistics belong to it."""

from __future__ import annotations

import hashlib

from moekit.families.layout import ModelLayout
from moekit.io.reader import Checkpoint


def model_fingerprint(checkpoint: Checkpoint, layout: ModelLayout) -> str:
    """sha256 (16 hex digits) of every tensor's name, dtype and shape plus the router weights'
    bytes: equal for the same checkpoint wherever it lives, different after any surgery or
    fine-tune of the routers. Reads only the router tensors (E x H per MoE layer)."""
    digest = hashlib.sha256()
    for name in sorted(checkpoint.tensors):
        info = checkpoint.tensors[name]
        digest.update(f"{name}|{info.dtype}|{info.shape}\n".encode())
    for layer in layout.moe_layers:
        info = checkpoint.tensors[layer.router_keys[0]]
        with open(info.shard, "rb") as handle:
            handle.seek(info.start)
            digest.update(handle.read(info.nbytes))
    return digest.hexdigest()[:16]
