"""lit_fast benchmarks: the workloads W1-W8 (bench/README.md). Run a script as `python -m bench.<name>` from the
repository root."""
