"""The framework-free HTTP core: routing, the security gate."""
