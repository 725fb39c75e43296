"""Generation: drawing code sequences from a prior (KV-cached, guided, per-sample seeded) and
decoding them to images. The `sample` stage drives these; models stay pure."""
