"""Analyses that read saved run records (record.json, trainable.safetensors) after training."""
