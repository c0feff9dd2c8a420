"""Logs (request ids, access lines, JSON format) and, later, metrics."""
