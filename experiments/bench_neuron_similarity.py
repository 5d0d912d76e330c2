#!/usr/bin/env python3
"""How similar are the neurons of different experts? (the precondition of neuron-level merging)

Neuron-recombination merges (DERN, arXiv 2509.10377; REAM's neuron alignment) move a dropped
expert's neurons into the kept expert that holds the most similar neuron, and only when the
cosine similarity of their segments exceeds a threshold (about 0.6 in DERN). A neuron's segment
is (gate row, up row, down column), concatenated: 3H numbers. This script reads any MoE
checkpoint's experts (headers + plain reads, every on-disk layout moekit merges) and prints, per
MoE layer, the distribution over neurons of the best cosine similarity to a neuron of *another*
expert. Experts upcycled from one dense model start with shared neurons (similarity 1 at
upcycling); for unrelated random directions the expected best similarity is about
sqrt(2 ln(E I) / 3H) (0.14 for 16 experts x 128 neurons, H = 256).

    .venv/bin/python experiments/bench_neuron_similarity.py ../shared/fixtures/models/mixtral-e16k2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.surgery.experts import Experts, expert_format, read_experts


def best_cross_similarity(experts: Experts) -> torch.Tensor:
    """[E * I]: for every neuron, max cosine of its segment to a neuron of another expert."""
    segments = torch.cat([experts.gate, experts.up, experts.down.transpose(1, 2)], dim=2)
    num, width = segments.shape[:2]
    unit = torch.nn.functional.normalize(segments.reshape(num * width, -1), dim=1)
    owner = torch.arange(num).repeat_interleave(width)
    best = torch.full((num * width,), -1.0)
    for start in range(0, num * width, 4096):  # bounded [4096, E*I] blocks
        sims = unit[start:start + 4096] @ unit.T
        sims[owner[start:start + 4096, None] == owner[None, :]] = -1.0
        best[start:start + 4096] = sims.max(dim=1).values
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threshold", type=float, default=0.6, help="DERN's merge threshold")
    args = parser.parse_args()
    checkpoint = Checkpoint(args.model)
    layout = describe(checkpoint)
    print(f"| layer | experts x neurons | median | p90 | max | share > {args.threshold} |")
    print("|---|---|---|---|---|---|")
    for layer in layout.moe_layers:
        experts = read_experts(checkpoint, expert_format(layout, layer))
        best = best_cross_similarity(experts)
        print(f"| {layer.index} | {experts.num_experts} x {experts.gate.shape[1]} | "
              f"{best.median():.3f} | {best.quantile(0.9):.3f} | {best.max():.3f} | "
              f"{(best > args.threshold).float().mean():.1%} |")


if __name__ == "__main__":
    main()
