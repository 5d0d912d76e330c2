"""Library operations behind the CLI commands: prune/, merge/, upcycle/, ablation/, convert/
packages and profile, evaluate (heldout: is the evaluated text the calibration text?), generate,
tasks, inspect. Each is a recipe over `surgery/`, `layerfit/` and the floors below; `ops/prune`
and `ops/merge` never import each other (docs/architecture.md)."""
