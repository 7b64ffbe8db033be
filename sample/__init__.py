"""Sampling: the composable C -> B -> A text-to-image pipeline."""
