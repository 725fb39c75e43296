"""Rebuilding a finished stage from what it kept, and saying what --force would throw away.

An output file of a finished stage that is missing or corrupt does not call for the work again:
a trained stage (train_tokenizer, train_prior) re-exports from its final checkpoint, which takes
seconds where training took days; a stage of units (shard, precompute_codes, sample) keeps every
unit that passes its hash and rewrites the rest, then rebuilds what is packed from them
(samples.npz from the chunks). The runner does this by running the stage again in place, without
clearing its folder, whenever it can: on a plain rerun, and on --force while the config and inputs
are unchanged (the checkpoints still match them). Only a changed config or input, or
--from-scratch, clears the folder, and every message offering --force says what it deletes.
"""
from __future__ import annotations

import re
from pathlib import Path

from .lock import is_lock_file
from .rundir import RunDir

CHECKPOINTS = "checkpoints"
_STEP_FOLDER = re.compile(r"^step_(\d{8})$")


def is_imported(done: dict | None) -> bool:
    """Recorded by `tessera import`: its inputs are the imported files, there is nothing to rebuild from."""
    inputs = (done or {}).get("inputs") or {}
    return bool(inputs) and all(k.startswith("import:") for k in inputs)


def checkpoint_steps(stage_dir: Path) -> list[int]:
    """Steps of the checkpoint folders a stage holds, newest first (complete or not)."""
    folder = Path(stage_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)) for p in folder.iterdir() if (m := _STEP_FOLDER.match(p.name))), reverse=True)


def final_checkpoint_step(stage_dir: Path, steps: int) -> int | None:
    """`steps` when a complete checkpoint of the last training step is there, else None."""
    from ..train.checkpoint import CheckpointManager

    manager = CheckpointManager(Path(stage_dir) / CHECKPOINTS)
    if steps in manager.steps() and manager.check_files(steps) is None:
        return steps
    return None


def rebuild_plan(module, run: RunDir, name: str) -> str | None:
    """How running finished stage `name` again in place rebuilds its outputs (completing the
    sentence "it ..."), or None when it cannot without redoing the work."""
    done = run.read_done(name)
    if is_imported(done):
        return None
    if getattr(module, "EXPORTS_FROM_CHECKPOINT", False):
        steps = ((done or {}).get("counts") or {}).get("steps")
        step = final_checkpoint_step(run.stage_dir(name), steps) if isinstance(steps, int) else None
        if step is None:
            return None
        return f"re-exports from its final checkpoint (step {step}) instead of training again"
    return "keeps every part that passes its check and rewrites the rest"


def describe_discard(stage_dir: Path) -> str:
    """What clearing a stage folder deletes, for every message that offers --force."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return f"nothing yet ({stage_dir} does not exist)"
    names = sorted(p.name for p in stage_dir.iterdir() if p.name != "log.txt" and not is_lock_file(p.name))
    parts = []
    steps = checkpoint_steps(stage_dir)
    if steps:
        parts.append(f"{len(steps)} checkpoint(s) up to step {steps[0]}")
    others = [n for n in names if n != CHECKPOINTS]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        parts.append(shown)
    return f"everything in {stage_dir} except its log: " + ("; ".join(parts) if parts else "nothing")


def remedy(module, run: RunDir, name: str) -> str:
    """The advice appended to "an output of finished stage `name` is missing or corrupt"."""
    plan = rebuild_plan(module, run, name)
    if plan is not None:
        return (f"rerun the {name} stage without --force (`tessera run CONFIG --run-dir {run.root} --stages {name}`): "
                f"it {plan}")
    if is_imported(run.read_done(name)):
        return f"import it again (`tessera import ... --run-dir {run.root} --force`)"
    return (f"rerun the {name} stage with --force, which deletes {describe_discard(run.stage_dir(name))} "
            f"and starts it over")
