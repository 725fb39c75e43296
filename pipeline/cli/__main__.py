"""`python -m pipeline.cli ...` is the `tessera` command (what torchrun and srun launch)."""
import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
