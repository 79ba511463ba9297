"""Analyses that read saved run records (record.json, delta_w.safetensors) after training."""
