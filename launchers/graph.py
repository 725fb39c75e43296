"""The stage graph of a submission and each stage's SLURM request.

A stage depends on the earlier stages it reads (its module's INPUTS), restricted to the
stages being submitted: a finished stage is not resubmitted and nothing waits for it. Each stage
becomes a `JobSpec`: its resources from the `launcher` section, resolved against the
launcher-wide defaults, as submitit parameters and as plain sbatch options.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.root import Config
from pipeline.config.schema import ConfigError
from pipeline.runner.fingerprint import stage_inputs
from pipeline.runner.rundir import STAGE_NAMES, RunDir
from pipeline.runner.stage import load_stage_module

DATA_PARALLEL_STAGES = ("shard", "precompute_codes", "sample")  # units of work: job arrays
TRAINING_STAGES = ("train_tokenizer", "train_prior")              # one rank per GPU, srun, many nodes


@dataclass
class JobSpec:
    stage: str
    depends_on: list[str]
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: int
    time_min: int
    array_tasks: int
    array_parallelism: int
    partition: str
    account: str
    qos: str
    constraint: str
    exclusive: bool
    sbatch_flags: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)

    @property
    def job_name(self) -> str:
        return f"tessera-{self.stage}"

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    def flag_parameters(self) -> dict:
        """The extra sbatch flags as submitit's `additional_parameters` ({'gres': 'gpu:8', 'requeue': True})."""
        params = {}
        for flag in self.sbatch_flags:
            name, sep, value = flag[2:].partition("=")
            params[name.replace("-", "_")] = value if sep else True
        return params

    def submitit_parameters(self, signal_delay_s: int) -> dict:
        """Parameters of submitit's SlurmExecutor.update_parameters (names without the slurm_ prefix)."""
        params = {"job_name": self.job_name, "nodes": self.nodes, "ntasks_per_node": self.tasks_per_node,
                  "cpus_per_task": self.cpus_per_task, "mem": f"{self.mem_gb}GB", "time": self.time_min,
                  "signal_delay_s": signal_delay_s, "stderr_to_stdout": True, "setup": list(self.setup),
                  "additional_parameters": {"requeue": True, **self.flag_parameters()}}
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.ranks > 1:
            # A rank that dies ends the step: the others stop at once instead of waiting in a
            # collective for launcher.collective_timeout_s.
            params["srun_args"] = ["--kill-on-bad-exit=1"]
        if self.array_parallelism:
            params["array_parallelism"] = self.array_parallelism
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[key] = getattr(self, key)
        if self.exclusive:
            params["exclusive"] = True
        return params

    def sbatch_options(self) -> list[str]:
        """The same request as sbatch command-line options (launchers/slurm/*.sbatch), one per item."""
        # Every value is given, 0 GPUs and 1-task arrays included: these override the #SBATCH
        # defaults written in the stage scripts.
        opts = [f"--job-name={self.job_name}", f"--nodes={self.nodes}", f"--ntasks-per-node={self.tasks_per_node}",
                f"--cpus-per-task={self.cpus_per_task}", f"--mem={self.mem_gb}G", f"--time={self.time_min}",
                f"--gpus-per-node={self.gpus_per_node}"]
        if self.stage in DATA_PARALLEL_STAGES:
            limit = f"%{self.array_parallelism}" if self.array_parallelism else ""
            opts.append(f"--array=0-{self.array_tasks - 1}{limit}")
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                opts.append(f"--{key}={getattr(self, key)}")
        if self.exclusive:
            opts.append("--exclusive")
        return opts + list(self.sbatch_flags)


def job_spec(cfg: Config, stage: str, depends_on: list[str] | None = None) -> JobSpec:
    launcher = cfg.launcher
    res = getattr(launcher, stage)
    if res.array_tasks > 1 and stage not in DATA_PARALLEL_STAGES:
        raise ConfigError(f"launcher.{stage}.array_tasks: only {', '.join(DATA_PARALLEL_STAGES)} run as job arrays; "
                          f"{stage} runs "
                          f"{'one rank per GPU on each node' if stage in TRAINING_STAGES else 'as one job'}"
                          f" (use nodes / gpus_per_node / tasks_per_node)")
    return JobSpec(
        stage=stage, depends_on=list(depends_on or []), nodes=res.nodes,
        tasks_per_node=res.gpus_per_node if res.gpus_per_node else res.tasks_per_node,
        gpus_per_node=res.gpus_per_node, cpus_per_task=res.cpus_per_task, mem_gb=res.mem_gb, time_min=res.time_min,
        array_tasks=res.array_tasks, array_parallelism=res.array_parallelism,
        partition=res.partition or launcher.partition, account=launcher.account, qos=res.qos or launcher.qos,
        constraint=res.constraint or launcher.constraint, exclusive=res.exclusive or launcher.exclusive,
        sbatch_flags=[*launcher.sbatch_flags, *res.sbatch_flags], setup=list(launcher.setup))


def select_stages(requested: str | None, implemented: list[str]) -> list[str]:
    if not requested:
        return list(implemented)
    names = [s.strip() for s in requested.split(",") if s.strip()]
    for name in names:
        if name not in STAGE_NAMES:
            raise ConfigError(f"--stages: unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}")
        if name not in implemented:
            raise ConfigError(f"--stages: stage {name!r} is not implemented yet; available: {', '.join(implemented)}")
    return [s for s in STAGE_NAMES if s in names]


def build_graph(cfg: Config, run_dir, stages: list[str]) -> tuple[list[JobSpec], list[str]]:
    """(jobs to submit in order, stages left out because they are done). A job waits for the
    submitted stages among its stage's INPUTS."""
    run = RunDir(run_dir)
    done = [s for s in stages if run.state(s).state == "done"]
    todo = [s for s in stages if s not in done]
    specs = []
    for stage in todo:
        inputs = stage_inputs(load_stage_module(stage))
        # An input that is neither done nor submitted: the stage itself names it when it starts.
        specs.append(job_spec(cfg, stage, [dep for dep in STAGE_NAMES if dep in inputs and dep in todo]))
    return specs, done


def format_graph(specs: list[JobSpec]) -> str:
    lines = []
    for spec in specs:
        after = f"  after {', '.join(spec.depends_on)}" if spec.depends_on else ""
        layout = f"array of {spec.array_tasks}" if spec.array_tasks > 1 else "one job"
        lines.append(f"  {spec.stage:<17} {layout}, {spec.nodes} node(s) x {spec.tasks_per_node} rank(s), "
                     f"{spec.gpus_per_node} GPU(s)/node, {spec.time_min} min{after}")
    return "\n".join(lines)
