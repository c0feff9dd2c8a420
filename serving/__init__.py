"""A production model server for MNIST-style image classifiers: Flask behind gunicorn.

Importing this package never imports a machine-learning framework; each backend imports its own
framework lazily, inside a gunicorn worker, after fork.
"""

__version__ = "0.1.0"
