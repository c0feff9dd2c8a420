"""The model repository on disk."""
