"""Training: Lightning modules for each stage, data, losses and the CLI (``python -m train``)."""
