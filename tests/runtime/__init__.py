"""The data plane: batching, the model table and model control."""
