"""moekit: see how Mixture-of-Experts checkpoints use their experts, and reshape them."""

__version__ = "0.1.0"
