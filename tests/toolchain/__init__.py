"""Datasets, nets, training and the MNIST download."""
