"""Builds models (datasets, nets, training, export, import): the server never imports it."""
