"""The tokenizer config section and its named presets (the paper settings and CPU demos).

A preset is a set of field values; `tokenizer.preset: NAME` in YAML applies them first and any
key written next to it overrides. `pipeline.models.registry.build_tokenizer(cfg)` turns the
resulting config into a model.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import ConfigError, option


@dataclass
class TokenizerConfig:
    preset: str = option("", "named preset applied before the keys written beside it (see TOKENIZER_PRESETS)",
                         affects=("train_tokenizer",))
    kind: str = option("rq", "vq = rq with depth 1; dq = dynamic (coarse/fine) quantization",
                       choices=("vq", "rq", "dq"), affects=("train_tokenizer",))
    # Encoder / decoder (VQGAN-style conv ResNet).
    ch: int = option(128, "base channel count", ge=8, affects=("train_tokenizer",))
    ch_mult: list[int] = option([1, 1, 2, 2, 4, 4], "channel multiplier per level; len-1 downsamplings", ge=1,
                                affects=("train_tokenizer",))
    num_res_blocks: int = option(2, "residual blocks per level", ge=1, affects=("train_tokenizer",))
    attn_resolutions: list[int] = option([8], "feature-map sides that get self-attention", ge=1,
                                         affects=("train_tokenizer",))
    z_channels: int = option(256, "latent (code vector) dimension", ge=1, affects=("train_tokenizer",))
    patch_size: int = option(1, "pixel-unshuffle stem: p x p pixel patches folded into channels before the first "
                                "conv (and unfolded after the last), so all levels run at R/p; 1 = plain VQGAN",
                         ge=1, le=16, affects=("train_tokenizer",))
    norm_groups: int = option(0, "GroupNorm groups in the encoder/decoder: 0 = 32, halved until each group has >= 4 "
                                 "channels (same as 32 from 128 channels on); N = exactly N groups (the authors' "
                                 "RQ-VAE code: 32 at every width; set by `tessera import rq-official`)", ge=0, le=1024,
                              affects=("train_tokenizer",))
    dropout: float = option(0.0, "dropout in residual blocks", ge=0.0, le=1.0, affects=("train_tokenizer",))
    grad_checkpointing: bool = option(False, "recompute encoder/decoder activations in backward to save memory",
                                      affects=("train_tokenizer",))
    # Quantizer.
    codebook_size: int = option(16384, "codes per codebook (K)", ge=2, le=65536, affects=("train_tokenizer",))
    depth: int = option(4, "residual depth D (vq: must be 1)", ge=1, le=64, affects=("train_tokenizer",))
    shared_codebook: bool = option(True, "one codebook for all depths (RQ-VAE default) or one per depth",
                                   affects=("train_tokenizer",))
    ema_decay: float = option(0.99, "EMA decay of codebook statistics", ge=0.0, le=0.99999,
                              affects=("train_tokenizer",))
    ema_eps: float = option(1e-5, "Laplace smoothing of EMA cluster sizes", gt=0.0, affects=("train_tokenizer",))
    beta: float = option(0.25, "commitment loss weight", ge=0.0, affects=("train_tokenizer",))
    dead_code_threshold: float = option(1.0, "EMA cluster size below which a code is restarted (0 disables)", ge=0.0,
                                        affects=("train_tokenizer",))
    kmeans_init: bool = option(False, "initialise the codebook by k-means on the first batch",
                               affects=("train_tokenizer",))
    soft_tau: float = option(0.5, "temperature of soft codes Q_tau for the prior's soft labels", gt=0.0,
                             affects=("train_prior",))
    # DQ (dynamic quantization).
    granularities: int = option(2, "dq: number of region sizes: 2 = coarse + fine (the triple-granularity variant "
                                "is not implemented)", choices=(2,), affects=("train_tokenizer",))
    router: str = option("learned", "dq: how regions choose a granularity", choices=("learned", "entropy"),
                         affects=("train_tokenizer",))
    target_ratio: float = option(0.5, "dq: target fraction of fine regions", ge=0.0, le=1.0,
                                 affects=("train_tokenizer",))
    budget_weight: float = option(
        10.0,
        "dq: budget loss weight gamma in gamma*(r - t)^2 (the paper's formula; the authors' "
        "released configs add the term twice: use 2*gamma to match them)",
        ge=0.0,
        affects=("train_tokenizer",),
    )
    gumbel_tau: float = option(1.0, "dq: Gumbel-softmax temperature of the learned router", gt=0.0,
                               affects=("train_tokenizer",))
    coarse_vq_weight: float = option(0.25, "dq: VQ-loss weight on copied coarse cells", ge=0.0,
                                     affects=("train_tokenizer",))
    entropy_bins: int = option(32, "dq entropy router: histogram bins over [-1, 1] (threshold: call "
                                   "pipeline.models.dq.calibrate_entropy_threshold before training)", ge=2,
                               affects=("train_tokenizer",))
    entropy_sigma: float = option(
        0.01,
        "dq entropy router: width of the Gaussian histogram kernel (dq_gaussian_entropy)",
        gt=0.0,
        affects=("train_tokenizer",),
    )
    # Fidelity to the authors' training code (docs/fidelity.md).
    # Each per-item key left null follows reference_behaviour.
    reference_behaviour: bool = option(True, "train as the authors' RQ-VAE / DQ-VAE code does; each per-item key below "
                                             "overrides it when set (null: follow this)", affects=("train_tokenizer",))
    ema_per_depth: bool | None = option(
        None,
        "rq shared codebook: EMA step (and restarts) after each depth, so depth d+1 "
        "searches the codebook depth d just updated (authors); false: one step "
        "after the whole search",
        affects=("train_tokenizer",),
    )
    authors_restart: bool | None = option(
        None,
        "dead-code restart as the authors: EMA sizes start at 0, every dead code "
        "gets a row of a permutation of that depth's inputs (noise-tiled when too "
        "few), code = vector / smoothed size; false: sizes start at 1, at most one "
        "code per input vector, code = vector",
        affects=("train_tokenizer",),
    )
    dq_gate_on_chosen: bool | None = option(
        None,
        "dq learned router: chosen features times their hard gate (authors: gate "
        "gradient <g, h_chosen>); false: gate*fine + (1-gate)*coarse "
        "(gradient <g, h_fine - h_coarse>)",
        affects=("train_tokenizer",),
    )
    dq_unweighted_vq: bool | None = option(
        None,
        "dq: VQ loss (1+beta)*mean(w*(z-q)^2) over all cells, gradient beta*..., "
        "EMA unweighted (authors); false: beta*sum(w*mse)/sum(w), EMA weighted by w",
        affects=("train_tokenizer",),
    )
    dq_gaussian_entropy: bool | None = option(None, "dq entropy router: Gaussian-kernel histogram (entropy_sigma) on "
                                                    "unclamped gray (authors); false: triangular bins on clamped gray",
                                              affects=("train_tokenizer",))
    dq_authors_layers: bool | None = option(
        None,
        "dq: router GroupNorm with 32 groups and the decoder's Fourier + row/column "
        "learned position embedding (authors); false: >= 4 channels per group "
        "and one learned position map (not checkpoint-compatible with true)",
        affects=("train_tokenizer",),
    )
    # Losses and discriminator.
    recon_loss: str = option("l2", "pixel reconstruction loss", choices=("l1", "l2"), affects=("train_tokenizer",))
    lpips_weight: float = option(1.0, "LPIPS perceptual loss weight (0 disables)", ge=0.0, affects=("train_tokenizer",))
    lpips_weights: str = option("", "path to LPIPS VGG16 weights (a state_dict file); required when lpips_weight > 0",
                                affects=("train_tokenizer",))
    gan_weight: float = option(0.75, "GAN loss weight (times the adaptive lambda)", ge=0.0,
                               affects=("train_tokenizer",))
    adaptive_weight_max: float = option(1e4, "clamp of the adaptive GAN weight", gt=0.0, affects=("train_tokenizer",))
    disc_start_step: int = option(0, "step at which the discriminator loss starts", ge=0, affects=("train_tokenizer",))
    disc_layers: int = option(2, "PatchGAN layers", ge=1, le=6, affects=("train_tokenizer",))
    disc_ndf: int = option(64, "PatchGAN base channels", ge=8, affects=("train_tokenizer",))
    disc_lr: float = option(0.0, "discriminator lr (0: same as the generator's)", ge=0.0, affects=("train_tokenizer",))

    @classmethod
    def preset_values(cls, name: str, path: str) -> dict:
        if name not in TOKENIZER_PRESETS:
            from ..config.schema import did_you_mean

            raise ConfigError(f"{path}: unknown tokenizer preset {name!r}.{did_you_mean(name, TOKENIZER_PRESETS)} "
                              f"Available: {', '.join(sorted(TOKENIZER_PRESETS))}.")
        return TOKENIZER_PRESETS[name]

    def validate(self, path: str) -> None:
        if self.kind == "vq" and self.depth != 1:
            raise ConfigError(f"{path}.depth: kind 'vq' is RQ with depth 1, got depth {self.depth}.")
        if self.kind == "dq" and len(self.ch_mult) < 2:
            raise ConfigError(f"{path}.ch_mult: dq needs at least 2 levels (fine and coarse grids).")
        if self.norm_groups and any(self.ch * m % self.norm_groups for m in self.ch_mult):
            raise ConfigError(f"{path}.norm_groups: {self.norm_groups} groups must divide every level's channels "
                              f"ch * ch_mult = {[self.ch * m for m in self.ch_mult]}.")
        if self.kind == "dq" and self.norm_groups:
            raise ConfigError(f"{path}.norm_groups: applies to rq/vq tokenizers (the DQ router and heads keep "
                              f"adaptive groups); use 0 with kind 'dq'.")
        if self.kind == "dq" and self.depth != 1:
            raise ConfigError(f"{path}.depth: dq uses one code per cell (depth 1), got depth {self.depth}.")

    def follows_authors(self, key: str) -> bool:
        """Resolved value of a per-item fidelity key (null follows `reference_behaviour`)."""
        return fidelity(self, key)

    @property
    def downsample_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.ch_mult) - 1)


FIDELITY_KEYS = ("ema_per_depth", "authors_restart", "dq_gate_on_chosen", "dq_unweighted_vq", "dq_gaussian_entropy",
                 "dq_authors_layers")


def fidelity(cfg, key: str) -> bool:
    """`cfg.<key>` if set, else `cfg.reference_behaviour` (also for configs that predate these keys)."""
    if key not in FIDELITY_KEYS:
        raise KeyError(f"unknown fidelity key {key!r}; one of {FIDELITY_KEYS}")
    value = getattr(cfg, key, None)
    return bool(getattr(cfg, "reference_behaviour", True)) if value is None else bool(value)


_RQ_PAPER = dict(kind="rq", ch=128, ch_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2, attn_resolutions=[8],
                 z_channels=256, depth=4, shared_codebook=True, grad_checkpointing=True, recon_loss="l2",
                 lpips_weight=1.0, gan_weight=0.75, disc_layers=2)

_DEMO_ARCH = dict(patch_size=4, ch=64, ch_mult=[1, 2], num_res_blocks=2, attn_resolutions=[], z_channels=32,
                  codebook_size=256, lpips_weight=0.0, gan_weight=0.0, recon_loss="l2")

TOKENIZER_PRESETS: dict[str, dict] = {
    # Paper settings (the RQ-VAE paper's and the authors' released configs): 256 px -> 8x8x4 with K=16384 (ImageNet)
    # or 2048 (FFHQ).
    "rq-imagenet256-8x8x4": dict(_RQ_PAPER, codebook_size=16384),
    "rq-ffhq256-8x8x4": dict(_RQ_PAPER, codebook_size=2048, attn_resolutions=[16]),
    "vq-imagenet256-16x16": dict(_RQ_PAPER, kind="vq", depth=1, ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[16],
                                 codebook_size=16384),
    "dq-imagenet256-dual-r0.5": dict(kind="dq", ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
                                     attn_resolutions=[16], z_channels=256, depth=1, codebook_size=1024,
                                     granularities=2, router="learned", target_ratio=0.5, budget_weight=10.0,
                                     recon_loss="l1", lpips_weight=1.0, gan_weight=0.75, disc_layers=3,
                                     grad_checkpointing=True),
    # CPU demos (32-64 px, minutes on 2 cores). LPIPS/GAN are off: no VGG weights can be downloaded here.
    # A 4x4 pixel-unshuffle stem and two levels (8x8, then the 4x4 code grid at 32 px): the same
    # downsampling as four plain levels at under half the compute, which buys the steps that make
    # the difference in a 3-minute CPU budget (docs/stages.md: what the CPU demos reach).
    "rq-demo": dict(_DEMO_ARCH, kind="rq", depth=4, shared_codebook=True),
    "vq-demo": dict(_DEMO_ARCH, kind="vq", depth=1),
    "dq-demo": dict(_DEMO_ARCH, kind="dq", depth=1, granularities=2, router="learned", target_ratio=0.5,
                    budget_weight=10.0),
}
