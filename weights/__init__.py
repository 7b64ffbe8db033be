"""Checkpoint formats and loading: safetensors exports with their metadata, Lightning checkpoints, loaders of every
network, LoRA adapter files, and conversion from and to the released Würstchen / Stable Cascade / diffusers layouts.

Imports the networks (``stages``, ``semantic_compressor``) and ``common``; no network imports it."""
