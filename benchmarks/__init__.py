"""Cost and efficiency benchmarks of the Würstchen stages (paper Sec. 4.2-4.3, Fig. 4, Table 2).

``python -m benchmarks --help``. Modules: ``targets`` (what is measured), ``measure`` (timing,
FLOPs, memory), ``throughput`` (per-module rows), ``reference`` (diffusers side by side),
``latency`` (sampling latency vs batch), ``cost`` (training schedule, MFU), ``presets`` (paper-scale
training presets on a GPU), ``report`` (JSON, markdown, plots).
"""
