"""Benchmarks: scripts that start real servers, drive them on loopback and write reports/."""
