"""Configuration: the typed sections, their schema and loader, and the generated reference."""
