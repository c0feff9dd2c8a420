"""The data plane: the served model table, loaded models, batching, admission, model control."""
