"""`tessera import rq-official`: the authors' RQ-VAE checkpoint layout -> our RQTokenizer.

The authors' code (kakaobrain/rq-vae-transformer) is not a dependency, so this file carries its own
float64 re-derivation of their stage-1 model from its published description (rqvae/models/rqvae/
{modules,layers,quantizations}.py): the tensor names and shapes their RQVAE.state_dict() has, and a
functional forward over exactly those tensors (GroupNorm(32, eps 1e-6), SiLU, ResnetBlocks with a
1x1 nin_shortcut, single-head attention with separate q/k/v 1x1 convs and softmax scale C^-1/2,
right/bottom-padded stride-2 downsampling, nearest x2 upsampling + conv, mid res/attn/res; the RQ
bottleneck's nn.Embedding with K+1 rows whose last is the padding row, searched over the first K).
A tiny checkpoint in their layout is written as model.pt + config.yaml, imported, and compared.
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from testkit import tessera

from pipeline.config.schema import ConfigError
from pipeline.importers.rq_official import (
    CheckpointMismatch,
    convert_stage1,
    load_stage1_state_dict,
    read_stage1_config,
)
from pipeline.importers.rq_official_stages import import_rq_official
from pipeline.runner.artifacts import load_tokenizer

GROUPS = 32  # their Normalize: always 32 groups


def their_config(*, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8, 4), resolution=16, z=16,
                 n_embed=24, depth=3, shared=True) -> dict:
    """A stage-1 config.yaml as their code saves it (arch section, plus the other sections they keep)."""
    side = resolution // 2 ** (len(ch_mult) - 1)
    return {
        "dataset": {"type": "imagenet", "transforms": {"type": "imagenet256x256"}},
        "arch": {
            "type": "rq-vae", "code_hier": 1, "ema": None, "checkpointing": False,
            "hparams": {"bottleneck_type": "rq", "embed_dim": z, "n_embed": n_embed, "latent_shape": [side, side, z],
                        "code_shape": [side, side, depth], "shared_codebook": shared, "decay": 0.99,
                        "restart_unused_codes": True, "loss_type": "mse", "latent_loss_weight": 0.25,
                        "use_padding_idx": False, "masked_dropout": 0.0},
            "ddconfig": {"double_z": False, "z_channels": z, "resolution": resolution, "in_channels": 3, "out_ch": 3,
                         "ch": ch, "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks,
                         "attn_resolutions": list(attn_resolutions), "dropout": 0.0},
        },
        "gan": {"disc": {"arch": {"in_channels": 3, "num_layers": 2, "use_actnorm": False, "ndf": 64,
                                  "spectral_norm": False}},
                "loss": {"disc_loss": "hinge", "gen_loss": "vanilla", "disc_weight": 0.75, "perceptual_weight": 1.0,
                         "disc_start": 0}},
    }


# ---- their key layout (names and shapes of RQVAE.state_dict()) ---------------------------------
def their_layout(config: dict) -> dict[str, tuple]:
    dd, hp = config["arch"]["ddconfig"], config["arch"]["hparams"]
    ch, mult, nrb, attn_res = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["attn_resolutions"]
    L, z = len(mult), dd["z_channels"]
    shapes: dict[str, tuple] = {}

    def conv(p, cin, cout, k):
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (cout, cin, k, k), (cout,)

    def norm(p, c):
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (c,), (c,)

    def resnet(p, cin, cout):
        norm(f"{p}.norm1", cin), conv(f"{p}.conv1", cin, cout, 3), norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cin, cout, 1)

    def attn(p, c):
        norm(f"{p}.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{name}", c, c, 1)

    def mid(p, c):
        resnet(f"{p}.block_1", c, c), attn(f"{p}.attn_1", c), resnet(f"{p}.block_2", c, c)

    conv("encoder.conv_in", 3, ch, 3)
    res, cin = dd["resolution"], ch
    for i in range(L):
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if res in attn_res:
                attn(f"encoder.down.{i}.attn.{j}", cin)
        if i != L - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
            res //= 2
    mid("encoder.mid", cin), norm("encoder.norm_out", cin), conv("encoder.conv_out", cin, z, 3)
    conv("quant_conv", z, hp["embed_dim"], 1), conv("post_quant_conv", hp["embed_dim"], z, 1)
    cin = ch * mult[-1]
    conv("decoder.conv_in", z, cin, 3), mid("decoder.mid", cin)
    for i in reversed(range(L)):
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if res in attn_res:
                attn(f"decoder.up.{i}.attn.{j}", cin)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
            res *= 2
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3, 3)
    K, C = hp["n_embed"], hp["embed_dim"]
    for d in range(hp["code_shape"][2]):  # a shared codebook is one module saved under every depth
        shapes[f"quantizer.codebooks.{d}.weight"] = (K + 1, C)
        shapes[f"quantizer.codebooks.{d}.cluster_size_ema"] = (K,)
        shapes[f"quantizer.codebooks.{d}.embed_ema"] = (K, C)
    return shapes


# ---- their forward, functional, over a state dict in their layout --------------------------------
def _gn(x, sd, p):
    return F.group_norm(x, GROUPS, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(x, sd, p, stride=1):
    w = sd[f"{p}.weight"]
    return F.conv2d(x, w, sd[f"{p}.bias"], stride=stride, padding=0 if stride == 2 else w.shape[-1] // 2)


def _resnet(x, sd, p):
    h = _conv(F.silu(_gn(x, sd, f"{p}.norm1")), sd, f"{p}.conv1")
    h = _conv(F.silu(_gn(h, sd, f"{p}.norm2")), sd, f"{p}.conv2")
    skip = _conv(x, sd, f"{p}.nin_shortcut") if f"{p}.nin_shortcut.weight" in sd else x
    return skip + h


def _attn(x, sd, p):
    h = _gn(x, sd, f"{p}.norm")
    B, C, H, W = x.shape
    q, k, v = (_conv(h, sd, f"{p}.{n}").reshape(B, C, H * W) for n in ("q", "k", "v"))
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * C ** -0.5, dim=-1)  # w[i, j]: query i, key j
    out = torch.einsum("bcj,bij->bci", v, w).reshape(B, C, H, W)
    return x + _conv(out, sd, f"{p}.proj_out")


def _level(h, sd, p, n_blocks):
    for j in range(n_blocks):
        h = _resnet(h, sd, f"{p}.block.{j}")
        if f"{p}.attn.{j}.norm.weight" in sd:
            h = _attn(h, sd, f"{p}.attn.{j}")
    return h


def _mid(h, sd, p):
    return _resnet(_attn(_resnet(h, sd, f"{p}.block_1"), sd, f"{p}.attn_1"), sd, f"{p}.block_2")


def ref_encode_latent(sd, config, x):
    dd = config["arch"]["ddconfig"]
    L, h = len(dd["ch_mult"]), _conv(x, sd, "encoder.conv_in")
    for i in range(L):
        h = _level(h, sd, f"encoder.down.{i}", dd["num_res_blocks"])
        if i != L - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2)
    h = _conv(F.silu(_gn(_mid(h, sd, "encoder.mid"), sd, "encoder.norm_out")), sd, "encoder.conv_out")
    return _conv(h, sd, "quant_conv")


def ref_codes(sd, config, z_BCHW):
    """Residual quantization: depth d searches book d's first K rows (their padding row is never a candidate)."""
    depth = config["arch"]["hparams"]["code_shape"][2]
    r = z_BCHW.permute(0, 2, 3, 1).reshape(-1, z_BCHW.shape[1])
    codes = []
    for d in range(depth):
        book = sd[f"quantizer.codebooks.{d}.weight"][:-1]
        dist = r.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1)[None] - 2 * r @ book.T
        c = dist.argmin(1)
        codes.append(c)
        r = r - book[c]
    B, _, H, W = z_BCHW.shape
    return torch.stack(codes, 1).reshape(B, H, W, depth)


def ref_decode(sd, config, codes_BHWD):
    dd = config["arch"]["ddconfig"]
    L = len(dd["ch_mult"])
    zq = sum(sd[f"quantizer.codebooks.{d}.weight"][codes_BHWD[..., d]] for d in range(codes_BHWD.shape[-1]))
    h = _conv(_conv(zq.permute(0, 3, 1, 2), sd, "post_quant_conv"), sd, "decoder.conv_in")
    h = _mid(h, sd, "decoder.mid")
    for i in reversed(range(L)):
        h = _level(h, sd, f"decoder.up.{i}", dd["num_res_blocks"] + 1)
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv")
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


# ---- a checkpoint in their layout -----------------------------------------------------------------
def images(n, resolution, seed=1):
    g = torch.Generator().manual_seed(seed)
    # smooth random images: a low-resolution field upsampled (closer to photos than white noise)
    low = torch.rand(n, 3, resolution // 4, resolution // 4, generator=g, dtype=torch.float64) * 2 - 1
    return F.interpolate(low, size=(resolution, resolution), mode="bilinear", align_corners=False)


def their_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in their layout (float64), with codebooks drawn from the model's own latents so
    every depth's search is a real choice (as after their EMA training)."""
    g = torch.Generator().manual_seed(seed)
    hp = config["arch"]["hparams"]
    sd = {}
    for key, shape in their_layout(config).items():
        if "quantizer." in key:
            continue
        if key.endswith(".bias"):
            sd[key] = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        elif len(shape) == 1:  # GroupNorm weight
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            sd[key] = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(math.prod(shape[1:]))
    K, depth, shared = hp["n_embed"], hp["code_shape"][2], hp["shared_codebook"]
    z = ref_encode_latent(sd, config, images(8, config["arch"]["ddconfig"]["resolution"], seed=seed + 100))
    r = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    books = []
    for _d in range(1 if shared else depth):
        if shared:  # vectors at several scales, as depth 0..D-1 need
            pool = torch.cat([r * 0.5 ** s for s in range(depth)])
        else:
            pool = r
        book = pool[torch.randperm(pool.shape[0], generator=g)[:K]] + 0.01 * torch.randn(K, r.shape[1], generator=g,
                                                                                          dtype=torch.float64)
        books.append(book)
        if not shared:
            dist = r.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1)[None] - 2 * r @ book.T
            r = r - book[dist.argmin(1)]
    sizes = [1 + 10 * torch.rand(K, generator=g, dtype=torch.float64) for _ in books]
    for d in range(depth):
        book, size = books[0 if shared else d], sizes[0 if shared else d]
        n = size.sum()
        smoothed = n * (size + 1e-5) / (n + K * 1e-5)
        sd[f"quantizer.codebooks.{d}.weight"] = torch.cat([book, torch.zeros(1, book.shape[1], dtype=torch.float64)])
        sd[f"quantizer.codebooks.{d}.cluster_size_ema"] = size
        sd[f"quantizer.codebooks.{d}.embed_ema"] = book * smoothed[:, None]
    return sd


def write_checkpoint(folder: Path, config: dict, state: dict, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 10, "state_dict": {k: v.float() for k, v in state.items()}, **extra}, folder / "model.pt")
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


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


@pytest.mark.e2e
def test_cli_import_status_and_precompute(tmp_path):
    config = their_config()
    state = their_state_dict(config)
    folder = write_checkpoint(tmp_path / "stage1", config, state)
    run = tmp_path / "run"
    data = ["data.num_train=24", "data.num_val=8", "data.shard_max_count=16"]
    out = tessera("import", "rq-official", "--stage1", str(folder), "--run-dir", str(run), *data)
    assert "train_tokenizer: done" in out.stdout
    done = json.loads((run / "train_tokenizer" / "done.json").read_text())
    assert done["counts"]["imported_tensors"] == len(state)
    assert all(k.startswith("import:rq-official/stage1/") for k in done["inputs"])
    status = tessera("status", str(run)).stdout
    assert re.search(r"^train_tokenizer\s+done\s", status, re.M), status
    assert tessera("verify", str(run)).returncode == 0
    # The exported tokenizer is the authors' model.
    model = load_tokenizer(run / "train_tokenizer")
    x = images(2, 16)
    sd32 = {k: v.float().double() for k, v in state.items()}
    codes_ref = ref_codes(sd32, config, ref_encode_latent(sd32, config, x))
    assert torch.equal(model.encode(x.float()), codes_ref)
    # Importing again is a no-op; a later `tessera run` on the run's own config keeps the imported
    # tokenizer (train_tokenizer skipped) and precompute_codes encodes the shards with it.
    again = tessera("import", "rq-official", "--stage1", str(folder), "--run-dir", str(run), *data)
    assert "train_tokenizer: skipped" in again.stdout
    out = tessera("run", str(run / "config.yaml"), "--run-dir", str(run), "--stages",
                  "shard,train_tokenizer,precompute_codes")
    assert "train_tokenizer: skipped" in out.stdout and "precompute_codes: done" in out.stdout
    # Another checkpoint into the same run dir is refused without --force.
    state2 = {k: v + 0.01 for k, v in state.items()}
    folder2 = write_checkpoint(tmp_path / "other", config, state2)
    refused = tessera("import", "rq-official", "--stage1", str(folder2), "--run-dir", str(run), *data, check=False)
    assert refused.returncode == 2 and "--force" in refused.stderr


@pytest.mark.e2e
def test_cli_imports_stage1_and_stage2_as_finished_stages(tmp_path):
    """--stage2: their RQ-Transformer over the imported codebook becomes a finished train_prior,
    with the logits of the direct import (checked against their formula in test_rq_transformer)."""
    from test_rq_transformer import _write_their_checkpoint

    from pipeline.importers.rq_official_prior import load_rq_official_prior
    from pipeline.runner.artifacts import load_prior

    config = their_config()
    state = their_state_dict(config)
    stage1 = write_checkpoint(tmp_path / "stage1", config, state)
    _write_their_checkpoint(tmp_path / "stage2", K=24, C=16, hwd=(4, 4, 3), classes=5)
    run = tmp_path / "run"
    data = ["data.num_train=24", "data.num_val=8", "data.shard_max_count=16"]
    out = tessera("import", "rq-official", "--stage1", str(stage1), "--stage2", str(tmp_path / "stage2"),
                  "--run-dir", str(run), *data)
    assert "train_tokenizer: done" in out.stdout and "train_prior: done" in out.stdout
    record = json.loads((run / "train_prior" / "import.json").read_text())
    assert record["state_dict"] == "state_dict_ema"  # what their sampling script loads
    prior = load_prior(run / "train_prior")
    book = load_tokenizer(run / "train_tokenizer").quantizer.embed
    direct, cfg, _ = load_rq_official_prior(tmp_path / "stage2", book)
    codes = torch.randint(0, 24, (3, 4, 4, 3), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 4, 2])
    with torch.no_grad():
        assert torch.equal(prior(codes, labels), direct(codes, labels))
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["num_classes"] == 5
    # The run's own config now skips both imported stages.
    again = tessera("run", str(run / "config.yaml"), "--run-dir", str(run), "--stages", "train_tokenizer,train_prior")
    assert "train_tokenizer: skipped" in again.stdout and "train_prior: skipped" in again.stdout
    # A stage-2 model of other codes than the stage-1 tokenizer makes is refused before anything is written.
    _write_their_checkpoint(tmp_path / "other", K=24, C=16, hwd=(2, 2, 3), classes=5)
    refused = tessera("import", "rq-official", "--stage1", str(stage1), "--stage2", str(tmp_path / "other"),
                      "--run-dir", str(tmp_path / "run2"), *data, check=False)
    assert refused.returncode == 2 and "pass the stage-1 folder it was trained on" in refused.stderr
    assert not (tmp_path / "run2").exists()
