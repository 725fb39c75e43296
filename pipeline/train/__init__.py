"""Trainers: each owns its step, its state (for exact resume) and its checkpoints."""
