"""``rlhfkit``: the one command line, dispatching to each package's own entry point."""
