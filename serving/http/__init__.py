"""The framework-free HTTP core: request state, answers, routing, the security gate, JSON
encoding."""
