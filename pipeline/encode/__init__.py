"""Encoding a dataset with a trained tokenizer (the precompute_codes stage's work)."""
