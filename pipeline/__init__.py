"""The text-to-image sampling pipeline: text encoders, the Stage C prior, the decoders (Stage B + A, pixel
decoder), the Stable Cascade v3 pipeline, request checks and limits. Used by ``train`` (validation grids) and
``sample`` (commands).

Imports ``diffusion``, ``weights``, ``imagedata``, the networks and ``common``."""
