"""Running models: one engine (`engine.open_model`) that loads a checkpoint whole or streams it
layer by layer under a memory budget, for every command that runs a model.

    engine.py   open_model, Engine.run (batches in, logits or hook side effects out), LayerStep
    options.py  RunOptions: device, dtype, --max-memory, trust_remote_code, one frozen record
    budget.py   --max-memory and every other share of the free memory: sizes (also from the
                headers alone), the memory / stream / expert-group decision, the weights held
    weights.py  checkpoint keys -> in-memory tensors (fused experts), read into place
    staging.py  checkpoint bytes straight into device memory through reused host buffers
    layers.py   the decoder stack, per-layer call arguments, the head replay (imports torch)
    hidden.py   hidden states between layers (RAM or a spill file)
    groups.py   experts of a too-large layer in groups; routed_experts, require_whole_layers
    spill.py    per-layer tensors kept on disk between a layered run and the write
    loading.py  whole-model / skeleton / tokenizer loading
    caches.py   caps on the CPU kernel caches (oneDNN primitives keyed by expert shapes)
    distributed.py  torchrun data parallelism: rank share of batches, reductions, failures

Imports `io/`, `families/`, `formats/`, `calib/` (and `errors`, `units`); see docs/architecture.md.
"""
