"""What every training stage shares: checkpoints, preemption signals, LR schedule, RNG state."""
from .checkpoint import CheckpointManager
from .rng import capture_rng_state, restore_rng_state
from .schedule import warmup_cosine
from .signals import PreemptionGuard, Preempted

__all__ = ["CheckpointManager", "PreemptionGuard", "Preempted", "capture_rng_state", "restore_rng_state",
           "warmup_cosine"]
