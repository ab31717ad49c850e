"""The `csml` command line (Typer + Rich)."""
