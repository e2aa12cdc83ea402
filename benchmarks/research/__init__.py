"""Research probes: one-off measurements behind the research log (docs/research/dhbe-log.md). They
run (CI smoke-runs each at a tiny size) but are not product benchmarks: `python -m benchmarks.research.NAME`."""
