"""The authors' checkpoint layouts (kakaobrain/rq-vae-transformer), re-derived for the tests.

Their code is not a dependency, so the tests carry their own float64 re-derivation of their models
from the published description, as plain functions over their state-dict names:

- stage 1 (rqvae/models/rqvae/{modules,layers,quantizations}.py): the tensor names and shapes their
  RQVAE.state_dict() has, and a functional forward over exactly those tensors (GroupNorm(32, eps
  1e-6), SiLU, ResnetBlocks with a 1x1 nin_shortcut, single-head attention with separate q/k/v 1x1
  convs and softmax scale C^-1/2, right/bottom-padded stride-2 downsampling, nearest x2 upsampling
  + conv, mid res/attn/res; the RQ bottleneck's nn.Embedding with K+1 rows whose last is the
  padding row, searched over the first K), and a writer of model.pt + config.yaml;
- stage 2 (rqvae/models/rqtransformer/{transformers,attentions}.py): the RQ-Transformer's logits
  and a writer of a random checkpoint in their layout.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

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


# ---- the authors' checkpoint layout -------------------------------------------------------
# A re-derivation of their forward pass from `rqvae/models/rqtransformer/{transformers,attentions}.py`,
# written as plain functions over their state-dict names (their module code is not imported).
def their_block(sd, p, x, n_head):
    def ln(h, name):
        return F.layer_norm(h, h.shape[-1:], sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"])

    def lin(h, name):
        return F.linear(h, sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"])

    B, L, E = x.shape
    h = ln(x, "ln1")
    q, k, v = (lin(h, f"attn.{n}").view(B, L, n_head, E // n_head).transpose(1, 2) for n in ("query", "key", "value"))
    att = (q @ k.transpose(-1, -2)) / math.sqrt(E // n_head)
    att = att.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    x = x + lin((att @ v).transpose(1, 2).reshape(B, L, E), "attn.proj")
    h = F.gelu(lin(ln(x, "ln2"), "mlp.0"))
    return x + lin(h, "mlp.2")


def their_prior_logits(sd, codes_BHWD, cond_B, book_KC, n_head, n_body, n_head_layers):
    B, H, W, D = codes_BHWD.shape
    xs = codes_BHWD.reshape(B, H * W, D)
    emb = book_KC[xs]                                                  # (B, T, D, C)
    x_emb = F.linear(emb, sd["input_mlp.weight"], sd["input_mlp.bias"]).sum(-2) + sd["pos_emb_hw"]
    cond = sd["cond_emb.weight"][cond_B][:, None] + sd["pos_emb_cond"]
    h = torch.cat([cond, x_emb[:, :-1]], 1)
    for i in range(n_body):
        h = their_block(sd, f"body_transformer.blocks.{i}", h, n_head)
    depth = F.linear(emb.cumsum(-2), sd["head_mlp.weight"], sd["head_mlp.bias"])
    z = torch.cat([h[:, :, None], depth[:, :, :-1]], 2).reshape(B * H * W, D, -1) + sd["pos_emb_d"]
    for i in range(n_head_layers):
        z = their_block(sd, f"head_transformer.blocks.{i}", z, n_head)
    z = F.layer_norm(z, z.shape[-1:], sd["classifier.layer_norm.weight"], sd["classifier.layer_norm.bias"])
    return F.linear(z, sd["classifier.linear.weight"], sd["classifier.linear.bias"]).view(B, H, W, D, -1)


def write_their_prior_checkpoint(folder, K=40, C=6, E=24, heads=3, body=2, head=2, classes=5, hwd=(2, 3, 3)):
    """A random stage-2 checkpoint (model.pt + config.yaml) in their layout; returns (state, codebook)."""
    g = torch.Generator().manual_seed(0)
    H, W, D = hwd
    shapes = {"cond_emb.weight": (classes, E), "pos_emb_cond": (1, 1, E), "pos_emb_hw": (1, H * W, E),
              "pos_emb_d": (1, D, E), "input_mlp.weight": (E, C), "input_mlp.bias": (E,),
              "head_mlp.weight": (E, C), "head_mlp.bias": (E,), "classifier.layer_norm.weight": (E,),
              "classifier.layer_norm.bias": (E,), "classifier.linear.weight": (K, E), "classifier.linear.bias": (K,)}
    for stack, n in (("body_transformer", body), ("head_transformer", head)):
        for i in range(n):
            p = f"{stack}.blocks.{i}"
            for name in ("ln1", "ln2"):
                shapes[f"{p}.{name}.weight"], shapes[f"{p}.{name}.bias"] = (E,), (E,)
            for name in ("key", "query", "value", "proj"):
                shapes[f"{p}.attn.{name}.weight"], shapes[f"{p}.attn.{name}.bias"] = (E, E), (E,)
            shapes[f"{p}.mlp.0.weight"], shapes[f"{p}.mlp.0.bias"] = (4 * E, E), (4 * E,)
            shapes[f"{p}.mlp.2.weight"], shapes[f"{p}.mlp.2.bias"] = (E, 4 * E), (E,)
    sd = {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}
    config = {"dataset": {"vocab_size": K}, "arch": {
        "type": "rq-transformer", "block_size": list(hwd), "embed_dim": E, "input_embed_dim": C,
        "shared_tok_emb": True, "shared_cls_emb": True, "input_emb_vqvae": True, "head_emb_vqvae": True,
        "cumsum_depth_ctx": True, "vocab_size_cond": classes, "block_size_cond": 1,
        "body": {"n_layer": body, "block": {"n_head": heads}}, "head": {"n_layer": head, "block": {"n_head": heads}}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"state_dict": sd, "state_dict_ema": {k: v + 0.01 for k, v in sd.items()}}, folder / "model.pt")
    return sd, torch.randn(K, C, generator=g)
