"""Launching the pipeline: SLURM through submitit (`tessera submit`, submit.py, graph.py, job.py,
jobs.py) and plain sbatch scripts (slurm/, sbatch_chain.py). docs/cluster.md."""
