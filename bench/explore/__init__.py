"""Kernel and host-path explorations behind docs/MEASUREMENTS.md (bench/explore/README.md): not workloads."""
