"""Running stages in a run directory: the stage runner, units of work, the stage lock, the run
directory layout and the exported model files later stages read."""
