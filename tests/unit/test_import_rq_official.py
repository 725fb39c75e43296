"""`tessera import rq-official`, stage 1: the authors' RQ-VAE checkpoint layout -> our RQTokenizer.

A tiny checkpoint in their layout (tests/authors_reference.py re-derives their model in float64) is
written as model.pt + config.yaml, imported, and compared; broken checkpoints and configs are refused
with the tensor or key named. The CLI path is in tests/e2e/test_import_rq_official_cli.py.
"""
import re

import pytest
import torch
import yaml
from authors_reference import (
    images,
    ref_codes,
    ref_decode,
    ref_encode_latent,
    their_config,
    their_state_dict,
    write_checkpoint,
)

from pipeline.config.schema import ConfigError
from pipeline.importers.rq_official import (
    CheckpointMismatch,
    convert_stage1,
    load_stage1_state_dict,
    read_stage1_config,
)
from pipeline.importers.rq_official_stages import import_rq_official

# ---- tests ------------------------------------------------------------------------------------
CASES = {
    "shared": dict(),  # attention at two levels, one block per level
    "per-depth": dict(shared=False, num_res_blocks=2, attn_resolutions=(16,), ch_mult=(1, 2), n_embed=16, depth=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_the_authors_model(tmp_path, case):
    config = their_config(**CASES[case])
    state = their_state_dict(config)
    folder = write_checkpoint(tmp_path / "stage1", config, state)
    spec = read_stage1_config(folder / "config.yaml")
    assert spec.tokenizer["norm_groups"] == 32 and spec.tokenizer["recon_loss"] == "l2"
    assert spec.tokenizer["gan_weight"] == 0.75 and spec.tokenizer["disc_layers"] == 2
    model = convert_stage1(load_stage1_state_dict(folder / "model.pt"), spec)

    sd32 = {k: v.float().double() for k, v in state.items()}  # the float32 values model.pt holds
    x = images(4, spec.resolution)
    z_ref = ref_encode_latent(sd32, config, x)
    codes_ref = ref_codes(sd32, config, z_ref)
    assert codes_ref[..., 1:].unique().numel() > 3, "the reference codebook should give varied codes at depth > 0"
    # Codes: our float32 search over our float32 latent equals their search in float64.
    codes = model.encode(x.float())
    assert torch.equal(codes, codes_ref)
    # Decode of the same codes: float32 to float tolerance; float64 to rounding (the same function).
    out_ref = ref_decode(sd32, config, codes_ref)
    assert (model.decode(codes).double() - out_ref).abs().max() < 1e-5
    model64 = model.double()
    assert (model64.encode_latent(x) - z_ref).abs().max() < 1e-10
    assert (model64.decode(codes) - out_ref).abs().max() < 1e-10
    # Their buffers became ours: EMA statistics kept, padding row dropped, nothing left to initialise.
    q = model.quantizer
    books = 1 if config["arch"]["hparams"]["shared_codebook"] else config["arch"]["hparams"]["code_shape"][2]
    K = config["arch"]["hparams"]["n_embed"]
    assert q.embed.shape == (books, K, 16) and bool(q.initialized) and int(q.update_step) == 0
    for b in range(books):
        assert torch.equal(q.cluster_size[b], state[f"quantizer.codebooks.{b}.cluster_size_ema"].float().double())
        assert torch.equal(q.embed_sum[b].float(), state[f"quantizer.codebooks.{b}.embed_ema"].float())


def _import_error(tmp_path, mutate) -> str:
    config = their_config()
    state = their_state_dict(config)
    mutate(state)
    folder = write_checkpoint(tmp_path / "stage1", config, state)
    with pytest.raises(CheckpointMismatch) as err:
        convert_stage1(load_stage1_state_dict(folder / "model.pt"), read_stage1_config(folder / "config.yaml"))
    return str(err.value)


def test_wrong_shape_names_both_tensors_and_shapes(tmp_path):
    def mutate(sd):
        sd["encoder.down.1.block.0.conv1.weight"] = torch.zeros(64, 32, 1, 1, dtype=torch.float64)

    msg = _import_error(tmp_path, mutate)
    assert "'encoder.down.1.block.0.conv1.weight'" in msg and "[64, 32, 1, 1]" in msg
    assert "'encoder.trunk.levels.1.blocks.0.conv1.weight'" in msg and "[64, 32, 3, 3]" in msg


def test_wrong_codebook_size_names_the_padding_row(tmp_path):
    def mutate(sd):  # a codebook without their padding row
        sd["quantizer.codebooks.0.weight"] = sd["quantizer.codebooks.0.weight"][:-1]

    msg = _import_error(tmp_path, mutate)
    assert "'quantizer.codebooks.0.weight'" in msg and "[24, 16]" in msg and "[25, 16]" in msg
    assert "'quantizer.embed'" in msg


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    msg = _import_error(tmp_path, lambda sd: sd.pop("decoder.up.0.block.1.norm2.bias"))
    assert "missing tensor 'decoder.up.0.block.1.norm2.bias'" in msg
    assert "'decoder.levels.2.blocks.1.norm2.bias'" in msg

    def add(sd):
        sd["encoder.down.0.block.0.temb_proj.weight"] = torch.zeros(32, 512, dtype=torch.float64)

    msg = _import_error(tmp_path / "b", add)
    assert "unexpected tensor 'encoder.down.0.block.0.temb_proj.weight'" in msg and "[32, 512]" in msg


def test_shared_codebook_copies_must_agree(tmp_path):
    def mutate(sd):
        sd["quantizer.codebooks.2.embed_ema"] = sd["quantizer.codebooks.2.embed_ema"] + 1

    assert "quantizer.codebooks.2.embed_ema" in _import_error(tmp_path, mutate)


@pytest.mark.parametrize("edit, key", [
    (lambda a: a["ddconfig"].update(double_z=True), "ddconfig.double_z"),
    (lambda a: a["hparams"].update(embed_dim=8, latent_shape=[4, 4, 8]), "hparams.embed_dim"),
    (lambda a: a["hparams"].update(code_shape=[2, 2, 3]), "hparams.code_shape"),
    (lambda a: a.update(type="rq-transformer"), "arch.type"),
    (lambda a: a["ddconfig"].pop("num_res_blocks"), "ddconfig.num_res_blocks"),
])
def test_unsupported_or_broken_configs_are_refused(tmp_path, edit, key):
    config = their_config()
    edit(config["arch"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=re.escape(key)):
        read_stage1_config(tmp_path / "config.yaml")


def test_their_defaults_apply_to_absent_keys(tmp_path):
    """Their loader fills restart_unused_codes=False and loss_type='l1' when a config omits them."""
    config = their_config()
    for key in ("restart_unused_codes", "loss_type", "decay"):
        config["arch"]["hparams"].pop(key)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    tok = read_stage1_config(tmp_path / "config.yaml").tokenizer
    assert tok["dead_code_threshold"] == 0.0 and tok["recon_loss"] == "l1" and tok["ema_decay"] == 0.99


def test_ema_weights_and_arch_overrides(tmp_path):
    config = their_config()
    state = their_state_dict(config)
    ema = {f"module.{k}": v.float() + 1 for k, v in state.items()}  # their EMA wrapper's prefix
    folder = write_checkpoint(tmp_path / "stage1", config, state, state_dict_ema=ema)
    spec = read_stage1_config(folder / "config.yaml")
    model = convert_stage1(load_stage1_state_dict(folder / "model.pt", ema=True), spec)
    assert torch.equal(model.quant_conv.weight, ema["module.quant_conv.weight"])
    with pytest.raises(CheckpointMismatch, match="no 'state_dict_ema'"):
        write_checkpoint(tmp_path / "plain", config, state)
        load_stage1_state_dict(tmp_path / "plain" / "model.pt", ema=True)
    with pytest.raises(ConfigError, match="tokenizer.ch: set by the checkpoint"):
        import_rq_official(stage1=folder, run_dir=tmp_path / "run", overrides=["tokenizer.ch=64"])
    with pytest.raises(ConfigError, match="arch.type 'rq-vae'"):  # a stage-1 folder passed as stage 2
        import_rq_official(stage1=folder, stage2=folder, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
