"""Training: the engine interface with its DDP and DeepSpeed back ends (engine.py), step-folder
checkpoints (checkpoint.py), RNG state (rng.py), the LR schedule (schedule.py), preemption
signals (signals.py), and the trainers, each owning its step and state for exact resume."""
