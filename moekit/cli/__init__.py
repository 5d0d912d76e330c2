"""The `moekit` command line: thin Typer commands over the library."""
