"""Process-level infrastructure every part uses: ranks and world size, atomic file I/O, user-facing
errors, logging and progress."""
