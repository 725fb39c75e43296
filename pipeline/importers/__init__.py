"""Converters from other codebases' released checkpoints into a Tessera run directory.

    tessera import rq-official --stage1 DIR [--stage2 DIR] --run-dir RUN_DIR
        rq_official.py          their RQ-VAE -> our tokenizer
        rq_official_prior.py    their RQ-Transformer -> our RQTransformer
        rq_official_stages.py   both as finished train_tokenizer / train_prior stages

An importer reads the foreign files (tensors only: `torch.load(weights_only=True)`), maps their
config into ours and their parameter names onto our modules with a shape check per tensor, and
writes the stage's outputs and done.json through the stage runner, exactly as the stage itself
would have: `tessera status`, `tessera verify` and the later stages then treat the run as trained.
"""
