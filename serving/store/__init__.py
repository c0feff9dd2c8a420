"""What is on disk: the model repository and TF Serving folders."""
