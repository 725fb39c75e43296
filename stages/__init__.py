"""One thin module per pipeline stage; each wires `pipeline` pieces together.

Contract (pipeline/runner/stage.py, docs/stage-contract.md): NAME, INPUTS, run(ctx); optional
external_inputs(ctx), check_config(cfg), verify_outputs(stage_dir). The config a stage reads is
declared on the config keys (option(affects=...)).
"""
