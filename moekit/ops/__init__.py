"""Library operations behind the CLI commands."""
