"""One sub-package per framework; see bench/registry.py for the list."""
