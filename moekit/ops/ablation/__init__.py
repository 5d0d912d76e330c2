"""Ablation importance: what removing one expert from one layer's routing does to the loss.

`run.ablate` (exact loss/KL change and first-order estimate per layer and expert),
`run.sample_batches` (the bounded token sample), `exact` and `first_order` (the two methods),
`variants` (batched re-routing hooks). See docs/profile.md, "Ablation importance".
"""
