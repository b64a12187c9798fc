"""Data: benchmark record shapes and loaders."""
