"""Launching the pipeline: SLURM through submitit (`tessera submit`: submit.py, graph.py, stage_job.py,
job_records.py) and plain sbatch scripts (slurm/, sbatch_chain.py). docs/cluster.md."""
