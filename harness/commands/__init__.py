"""One module per CLI command: its arguments and what it does."""
