"""Generation: drawing code sequences from a prior (KV-cached, guided, per-sample seeded) and
decoding them to images, and the files the samples are stored in (sample_files.py). The `sample`
stage drives these; models stay pure."""


def sample_codes(model, labels, indices, seed, opts=None):
    """RQ codes (B, H, W, D) or DQ token triples for the given samples (dispatch on the prior's kind)."""
    if model.spec.kind == "rq":
        from .rq_sampler import sample_rq

        return sample_rq(model, labels, indices, seed, opts)
    from .dq_sampler import sample_dq

    return sample_dq(model, labels, indices, seed, opts)
