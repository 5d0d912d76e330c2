"""Running models: the engine that loads or streams layers, and data-parallel runs."""
