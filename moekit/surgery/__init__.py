"""Checkpoint-level expert surgery, no model built: the pruning plan, one MoE layer's experts in
canonical form <-> every on-disk layout, and the tensor helpers both writers share (take rows,
rename per-expert keys, patch the config, account for every source tensor).

    plan.py     PrunePlan / LayerPlan: which experts each layer keeps, JSON round trip, checks
    experts.py  canonical float32 experts <-> per-expert / fused / transposed / interleaved layouts
    stored.py   expert tensors read from / written back into their stored format (quantized
                ones decoded, changed ones re-encoded: FP8 blocks, MXFP4), byte reads
    tensors.py  take_rows, renamed_expert_key, patch_config, the accounting check

Imports only `io/`, `families/`, `formats/`, `stats/` (and `errors`, `units`); see
docs/architecture.md.
"""
