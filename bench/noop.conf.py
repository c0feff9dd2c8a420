"""An empty gunicorn config, so the no-op floor runs with only the flags the benchmark passes."""
