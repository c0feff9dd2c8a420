"""Developer tools: the real-server test harness, the model benchmark, docs generation."""
