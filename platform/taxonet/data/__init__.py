"""Data: synthetic source, dataset format, prepare, transforms and the Ray Data pipeline."""
