"""Semantic compressor: EfficientNetV2-S features -> 16 channels at ~42:1 spatial compression (SPEC)."""
