"""Model and tokenizer loading now live in `moekit.runtime.loading` (re-exported here)."""

from moekit.runtime.loading import (  # noqa: F401
    DTYPES,
    load_model,
    load_tokenizer,
    pick_device,
    quiet_transformers,
)
