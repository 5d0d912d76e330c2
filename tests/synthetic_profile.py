"""Profiles built from synthetic routing (no model): known top-k ids -> LayerRaw -> Profile."""

from __future__ import annotations

import numpy as np

from moekit.calib.recorder import LayerRaw
from moekit.stats.profile import Profile
from moekit.stats.profile_io import profile_from_raw


def random_ids(rng: np.random.Generator, rates: np.ndarray, tokens: int, k: int) -> np.ndarray:
    """[tokens, k] distinct expert ids per token, drawn without replacement with weights rates."""
    with np.errstate(divide="ignore"):  # rate 0 -> key 0: never drawn
        keys = rng.random((tokens, rates.size)) ** (1.0 / rates)  # Efraimidis-Spirakis
    return np.argsort(-keys, axis=1)[:, :k]


def layer_raw(layer: int, ids_per_domain: list[np.ndarray], num_experts: int,
              window: int) -> LayerRaw:
    """Sums of one layer from [T_d, k] ids per domain; windows are `window` consecutive tokens."""
    num_domains, e = len(ids_per_domain), num_experts
    tokens = np.stack([np.bincount(ids.ravel(), minlength=e) for ids in ids_per_domain])
    coact = np.zeros((num_domains, e, e), dtype=np.int64)
    for d, ids in enumerate(ids_per_domain):
        np.add.at(coact[d], (ids[:, :, None], ids[:, None, :]), 1)
    windows = [np.stack([np.bincount(ids[s:s + window].ravel(), minlength=e)
                         for s in range(0, len(ids), window)]).astype(np.int32)
               for ids in ids_per_domain]
    zeros = np.zeros((num_domains, e))
    return LayerRaw(layer=layer, num_experts=e, tokens=tokens.astype(np.int64),
                    weight_sum=tokens / 2.0, ean_sum=tokens * 1.0, reap_sum=tokens / 2.0,
                    max_norm=zeros + 1.0, coact=coact,
                    positions=np.array([len(i) for i in ids_per_domain], dtype=np.int64),
                    entropy_sum=np.zeros(num_domains), top1_pairs=np.zeros(num_domains, np.int64),
                    top1_repeats=np.zeros(num_domains, np.int64), window_tokens=windows,
                    window_reap=[w.astype(np.float32) / 2 for w in windows],
                    window_weight=[w.astype(np.float32) / 4 for w in windows],
                    window_ean=[w.astype(np.float32) for w in windows])


def synthetic_profile(rates: list[np.ndarray], k: int, tokens: int, seed: int = 0,
                      domains: tuple[str, ...] = ("a",), window: int = 64,
                      num_layers: int | None = None, first_moe: int = 0
                      ) -> tuple[Profile, list[list[np.ndarray]]]:
    """A profile whose MoE layer i (decoder layer first_moe + i) routes with `rates[i]`; also
    returns the ids [layer][domain] -> [T, k]."""
    rng = np.random.default_rng(seed)
    e = rates[0].size
    ids = [[random_ids(rng, r, tokens, k) for _ in domains] for r in rates]
    raw = [layer_raw(first_moe + i, per, e, window) for i, per in enumerate(ids)]
    moe_layers = [first_moe + i for i in range(len(rates))]
    meta = {"model": "synthetic", "model_fingerprint": f"synthetic-{seed}",
            "num_layers": num_layers or first_moe + len(rates), "moe_layers": moe_layers,
            "num_experts": [e] * len(rates), "top_k": [k] * len(rates),
            "domains": {d: {"tokens": tokens, "sha256": f"{seed}-{d}", "files": []}
                        for d in domains}}
    return profile_from_raw(raw, list(domains), meta), ids
