"""Helpers every layer shares, below the networks: one-line errors and exit codes, atomic files, argparse types and
output checks, tensor input checks, strict state-dict loading, the DictConfig base of network configs, image metrics.

Imports torch and third-party libraries only, never another package of this project."""
