"""One thin module per pipeline stage; each wires `pipeline` pieces together.

Contract (see pipeline/runner/stage.py): NAME, SECTIONS, input_fingerprints(ctx), run(ctx).
"""
