"""Config sections, one per concern. Each field: default, help, and allowed values.

The tokenizer and prior sections live with the models (pipeline/models/tokenizer_config.py,
prior_config.py) because their presets are the model registry's.
"""
from __future__ import annotations

from dataclasses import dataclass

from .schema import OWNER, RUNTIME, ConfigError, option


@dataclass
class DataConfig:
    source: str = option("synthetic", "where images come from: the embedded procedural dataset, an ImageFolder tree, "
                         "or an existing webdataset shard set (wds_train / wds_val; docs/data.md)",
                         choices=("synthetic", "imagefolder", "webdataset"), affects=("shard",))
    synthetic_style: str = option("textures", "synthetic: 'shapes' (one large flat-coloured object, classes told "
                                  "apart by shape and colour: the CPU demos) or 'textures' (small objects, classes "
                                  "told apart by fine textures)", choices=("shapes", "textures"), affects=("shard",))
    root: str = option("", "ImageFolder root (one sub-folder per class, optional train/ and val/ sub-trees)",
                       affects=("shard",))
    wds_train: str = option("", "webdataset source: brace pattern of the train shards: a local path, a 'pipe:' "
                            "command writing the tar to stdout, or an http(s) URL, e.g. "
                            "'pipe:aws s3 cp s3://bucket/in-{000000..001281}.tar -'", affects=("shard",))
    wds_val: str = option("", "webdataset source: brace pattern of the val shards (empty: no val split)",
                          affects=("shard",))
    wds_image_key: str = option("jpg", "webdataset source: member extension holding the image (e.g. jpg, png, webp)",
                                affects=("shard",))
    wds_label_key: str = option("cls", "webdataset source: member holding the integer label: an extension ('cls') or "
                                "'json.FIELD' for a field of the sample's JSON member", affects=("shard",))
    wds_mode: str = option("reshard", "webdataset source: 'reshard' decodes, resizes/crops and writes our own shards; "
                           "'index' only lists the existing shards (count, sha256, corrupt samples) in the manifest, "
                           "without copying: every image must already be resolution x resolution",
                           choices=("reshard", "index"), affects=("shard",))
    fetch_retries: int = option(3, "shard URLs: attempts after the first failed read of a shard, then the error names "
                                "the URL", ge=0, le=100, affects=RUNTIME)
    ca_bundle: str = option("", "https shard URLs: PEM file of the certificate authorities to trust (curl --cacert); "
                            "empty: the system's (or curl's CURL_CA_BUNDLE variable). Verification is never off",
                            affects=RUNTIME)
    reader: str = option("indexed", "reader of the train/val shards: 'indexed' (random access to local shards, a "
                         "global per-epoch permutation) or 'stream' (webdataset pipeline: shards split over ranks "
                         "and workers, shard order and in-shard order seeded per epoch; the only one for 'index'ed "
                         "URL shard sets, chosen by itself there)", choices=("indexed", "stream"),
                         affects=("train_tokenizer",))
    resolution: int = option(64, "side of the square images after resize + center crop (px)", ge=8, le=1024,
                             affects=("shard", "train_tokenizer", "precompute_codes"))
    num_classes: int = option(10, "number of classes (synthetic: renders this many; imagefolder: the class folders "
                              "expected, a different count is warned about; webdataset: labels must lie in "
                              "[0, num_classes))", ge=1, le=100000, affects=("shard",))
    num_train: int = option(2000, "synthetic: images in the train split", ge=1, affects=("shard",))
    num_val: int = option(200, "synthetic: images in the val split", ge=0, affects=("shard",))
    val_fraction: float = option(0.02, "imagefolder without a val/ folder: seeded fraction held out for val",
                                 ge=0.0, le=0.5, affects=("shard",))
    format: str = option("webdataset", "shard format", choices=("webdataset", "mds"), affects=("shard",))
    shard_max_count: int = option(1000, "max images per shard", ge=1, affects=("shard",))
    shard_max_bytes: int = option(256 << 20, "max bytes per shard (whichever limit is hit first)", ge=1024,
                                  affects=("shard",))
    image_encoding: str = option("png", "how images are stored inside shards", choices=("png", "jpeg"),
                                 affects=("shard",))
    shard_decode_processes: int = option(0, "shard: processes decoding/encoding images per worker (0: the CPU cores "
                                         "available, divided among the ranks of the node)", ge=0, le=256,
                                         affects=RUNTIME)
    max_reject_fraction: float = option(0.01, "fail the shard stage if more than this fraction of inputs is unreadable",
                                        ge=0.0, le=1.0, affects=RUNTIME)
    random_crop: bool = option(False, "reader: random crop (pad 1/8 then crop) instead of the stored center crop",
                               affects=("train_tokenizer",))
    hflip: bool = option(False, "reader: random horizontal flip", affects=("train_tokenizer",))
    num_workers: int = option(0, "reader: DataLoader worker processes per rank", ge=0, le=64, affects=RUNTIME)

    def validate(self, path: str) -> None:
        if self.source == "imagefolder" and not self.root:
            raise ConfigError(f"{path}.root: required when {path}.source is 'imagefolder' "
                              "(path to the ImageFolder tree).")
        if self.source == "webdataset" and not self.wds_train:
            raise ConfigError(f"{path}.wds_train: required when {path}.source is 'webdataset' (brace pattern of the "
                              f"train shards, e.g. /data/in-{{000000..000099}}.tar).")
        if self.source == "synthetic" and not 16 <= self.resolution <= 256:
            raise ConfigError(f"{path}.resolution: the synthetic dataset renders 16..256 px, got {self.resolution}.")


@dataclass
class TrainConfig:
    """Optimisation settings; used twice: `tokenizer_train` and `prior_train`."""
    steps: int = option(1000, "optimizer steps in total", ge=1, affects=OWNER)
    batch_size: int = option(32, "global batch size (images per optimizer step, all ranks together)", ge=1,
                             affects=OWNER)
    grad_accum: int = option(1, "micro-batches per optimizer step on each rank", ge=1, affects=OWNER)
    lr: float = option(4e-5, "peak learning rate", gt=0.0, affects=OWNER)
    betas: list[float] = option([0.5, 0.9], "Adam betas", ge=0.0, le=1.0, affects=OWNER)
    weight_decay: float = option(0.0, "decoupled weight decay", ge=0.0, affects=OWNER)
    warmup_steps: int = option(0, "linear warm-up steps before the cosine decay", ge=0, affects=OWNER)
    min_lr_ratio: float = option(0.0, "final lr as a fraction of the peak (cosine floor)", ge=0.0, le=1.0,
                                 affects=OWNER)
    grad_clip: float = option(1.0, "max global gradient norm (0 disables clipping)", ge=0.0, affects=OWNER)
    precision: str = option("auto", "auto = bf16 autocast on GPU, fp32 on CPU", choices=("auto", "fp32", "bf16"),
                            affects=OWNER)
    engine: str = option("ddp", "training engine: torch DDP, or DeepSpeed ZeRO (docs/stages.md: Training engine)",
                         choices=("ddp", "deepspeed"), affects=OWNER)
    zero_stage: int = option(1, "DeepSpeed ZeRO stage, used with engine=deepspeed (the tokenizer: 0-2)", ge=0, le=3,
                             affects=OWNER)
    checkpoint_every: int = option(200, "save a checkpoint every N steps", ge=1, affects=RUNTIME)
    keep_checkpoints: int = option(2, "how many most recent checkpoints to keep", ge=1, affects=RUNTIME)
    log_every: int = option(10, "TensorBoard scalars every N steps", ge=1, affects=RUNTIME)
    eval_every: int = option(0, "eval on val shards every N steps (0: only at the end)", ge=0, affects=OWNER)
    eval_images: int = option(200, "val images used per eval", ge=1, affects=OWNER)


@dataclass
class TokenizerTrainConfig(TrainConfig):
    """`tokenizer_train`: TrainConfig plus what only the tokenizer's eval uses."""
    eval_classifier: bool = option(False, "eval: also report a probe classifier's accuracy on val originals vs "
                                   "reconstructions (trained once on the train shards, cached in RUN_DIR/classifier)",
                                   affects=OWNER)
    rfid_images: int = option(0, "final eval: rFID of the reconstructions of the first N val images against "
                                 "those images (capped at the split; 0: off; 50000 = ImageNet val). Inception "
                                 "weights as the score section says; *_uncalibrated without them", ge=0,
                              affects=RUNTIME)


@dataclass
class PriorTrainConfig(TrainConfig):
    """`prior_train`: TrainConfig with the authors' prior recipe as defaults, plus what only the prior uses."""
    lr: float = option(5e-4, "peak learning rate", gt=0.0, affects=OWNER)
    betas: list[float] = option([0.9, 0.95], "AdamW betas", ge=0.0, le=1.0, affects=OWNER)
    weight_decay: float = option(1e-4, "AdamW weight decay on Linear weights (none on norms, embeddings, "
                                       "position tables and biases)", ge=0.0, affects=OWNER)
    engine: str = option("deepspeed", "training engine: DeepSpeed ZeRO (default) or torch DDP",
                         choices=("ddp", "deepspeed"), affects=OWNER)
    zero_stage: int = option(2, "DeepSpeed ZeRO stage 0-3 (3 also partitions the parameters)", ge=0, le=3,
                             affects=OWNER)
    targets: str = option("codes", "codes = cross-entropy on the stored codes; soft = the authors' soft targets "
                                   "Q_tau from the stored latents (needs precompute.store_latents)",
                          choices=("codes", "soft"), affects=OWNER)
    stochastic_codes: bool = option(True, "soft targets: feed codes sampled from Q_tau as inputs (the authors' "
                                          "stochastic codes) instead of the stored argmin codes", affects=OWNER)
    ema_decay: float = option(0.0, "EMA of the weights, exported instead of the raw weights (0: off; "
                                   "e.g. 0.9999)", ge=0.0, le=0.999999, affects=OWNER)
    offload_optimizer: bool = option(False, "DeepSpeed: keep optimizer states in CPU memory (ZeRO 1-3)", affects=OWNER)
    offload_params: bool = option(False, "DeepSpeed: keep parameters in CPU memory (ZeRO 3 only)", affects=OWNER)
    deepspeed_config: str = option("", "a DeepSpeed JSON merged over the generated one (its keys win; "
                                       "docs/stages.md: Training the prior)", affects=OWNER)
    checkpoint_every_min: float = option(0.0, "also checkpoint every M minutes of training (0: off)", ge=0.0,
                                         affects=RUNTIME)
    sample_every: int = option(0, "write a grid of samples (PNG + TensorBoard) every N steps (0: at the end only)",
                               ge=0, affects=RUNTIME)
    eval_images: int = option(1000, "val code samples per val-loss evaluation", ge=1, affects=OWNER)


@dataclass
class PrecomputeConfig:
    batch_size: int = option(64, "images encoded per batch on each rank", ge=1, affects=("precompute_codes",))
    store_latents: bool = option(False, "also store the fp16 pre-quantization latent (for soft-label prior training)",
                                 affects=("precompute_codes",))
    augment: str = option("none", "extra encoded views per image", choices=("none", "hflip", "tencrop"),
                          affects=("precompute_codes",))
    verify_images: int = option(32, "seeded sample of stored codes decoded to check PSNR at the end", ge=0,
                                affects=RUNTIME)
    crop_range: float = option(1.1, "tencrop: the stored image is upscaled by this factor before the ten crops "
                               "(LlamaGen's crop_range)", ge=1.0, le=2.0, affects=("precompute_codes",))
    precision: str = option("auto", "encoder precision: auto = bf16 autocast on GPU, fp32 on CPU",
                            choices=("auto", "fp32", "bf16"), affects=("precompute_codes",))


@dataclass
class SampleConfig:
    num_samples: int = option(50000, "images to generate; class-conditional: sample i has class i mod num_classes "
                                     "(exactly balanced when it divides; else the first classes get one more)", ge=1,
                              affects=("sample",))
    batch_size: int = option(64, "samples drawn per batch (the same on every rank: a chunk's bytes do not depend "
                                 "on the launch)", ge=1, affects=("sample",))
    chunk_size: int = option(1000, "samples per output tar (the unit of work and of resume)", ge=1, affects=("sample",))
    temperature: float = option(1.0, "softmax temperature (contents for dq)", gt=0.0, affects=("sample",))
    top_k: list[int] = option([0], "top-k per depth (rq; the last value repeats), contents for dq; 0: off", ge=0,
                              affects=("sample",))
    top_p: list[float] = option([1.0], "top-p per depth (rq; the last repeats), contents for dq; 1.0: off", gt=0.0,
                                le=1.0, affects=("sample",))
    position_temperature: float = option(1.0, "dq: temperature of the position draws", gt=0.0, affects=("sample",))
    position_top_k: int = option(0, "dq: top-k of the position draws (the authors: 1024); 0: off", ge=0,
                                 affects=("sample",))
    position_top_p: float = option(1.0, "dq: top-p of the position draws", gt=0.0, le=1.0, affects=("sample",))
    cfg_scale: float = option(1.0, "classifier-free guidance scale (1.0: off; needs a prior trained with "
                                   "class_dropout > 0)", ge=0.0, affects=("sample",))
    cfg_schedule: str = option("constant", "guidance over the sequence: constant, or linear from 1 to cfg_scale",
                               choices=("constant", "linear"), affects=("sample",))
    grid_classes: int = option(10, "sample grid: this many classes (rows), 8 samples each", ge=1, affects=RUNTIME)


@dataclass
class ScoreConfig:
    metrics: list[str] = option(["fid", "isc", "kid", "prc"], "metrics to compute (FID, Inception Score, KID, "
                                "precision/recall)", choices=("fid", "isc", "kid", "prc"), affects=("score",))
    reference: str = option("", "reference: empty = the dataset's shards (reference_split; statistics cached in "
                                "the run directory), or an .npz: the ADM batch (mu, sigma, arr_0) or stats (mu, sigma)",
                            affects=("score",))
    reference_split: str = option("val", "shard split used as the reference when `reference` is empty",
                                  choices=("train", "val"), affects=("score",))
    inception_weights: str = option("", "torch-fidelity's inception-v3-compat weights (.pth); empty: its download "
                                        "cache or the download", affects=("score",))
    download_weights: bool = option(True, "download the Inception weights when no file is given or cached",
                                    affects=("score",))
    allow_uncalibrated: bool = option(False, "without Inception weights, use a seeded random Inception: metrics "
                                             "are named *_uncalibrated (never FID); the demos set it",
                                      affects=("score",))
    batch_size: int = option(50, "images per Inception batch", ge=1, affects=RUNTIME)
    kid_subset_size: int = option(1000, "KID subset size (capped at the smaller set)", ge=2, affects=("score",))
    classifier_check: bool = option(True, "also report the dataset probe classifier's accuracy on class-conditional "
                                          "samples vs real val images", affects=("score",))


def _check_sbatch_flags(flags: list[str], path: str) -> None:
    for flag in flags:
        name = flag.split("=", 1)[0]
        if not (name.startswith("--") and len(name) > 2 and all(c.isalnum() or c == "-" for c in name[2:])):
            raise ConfigError(f"{path}: {flag!r} is not a long sbatch option; write it as '--name=value' or "
                              f"'--name' (e.g. '--reservation=big', '--gres=gpu:a100:8')")


@dataclass
class Resources:
    """What one stage's SLURM job asks for (`tessera submit`, launchers/). Empty strings fall back
    to the launcher-wide value of the same name."""
    nodes: int = option(1, "SLURM nodes (training stages: one rank per GPU on every node, started by srun)", ge=1,
                        affects=RUNTIME)
    gpus_per_node: int = option(0, "GPUs (= ranks) per node; 0 runs CPU ranks", ge=0, le=16, affects=RUNTIME)
    tasks_per_node: int = option(1, "ranks per node when gpus_per_node is 0", ge=1, affects=RUNTIME)
    cpus_per_task: int = option(2, "CPU cores per rank", ge=1, affects=RUNTIME)
    mem_gb: int = option(16, "memory per node (GB)", ge=1, affects=RUNTIME)
    time_min: int = option(60, "wall-time limit (minutes)", ge=1, affects=RUNTIME)
    array_tasks: int = option(1, "SLURM array size (data-parallel stages shard / precompute_codes / sample only)",
                              ge=1, affects=RUNTIME)
    array_parallelism: int = option(0, "at most this many array tasks run at once (0: no limit)", ge=0, affects=RUNTIME)
    partition: str = option("", "SLURM partition of this stage (empty: launcher.partition)", affects=RUNTIME)
    qos: str = option("", "SLURM quality of service of this stage (empty: launcher.qos)", affects=RUNTIME)
    constraint: str = option("", "SLURM node constraint of this stage, e.g. 'h100' (empty: launcher.constraint)",
                             affects=RUNTIME)
    exclusive: bool = option(False, "whole nodes for this stage (--exclusive; also when launcher.exclusive)",
                             affects=RUNTIME)
    sbatch_flags: list[str] = option([], "extra sbatch options of this stage, added after launcher.sbatch_flags, "
                                     "e.g. ['--gres=gpu:a100:8']", affects=RUNTIME)

    def validate(self, path: str) -> None:
        _check_sbatch_flags(self.sbatch_flags, f"{path}.sbatch_flags")


@dataclass
class LauncherConfig:
    partition: str = option("", "SLURM partition (empty: cluster default)", affects=RUNTIME)
    account: str = option("", "SLURM account (empty: none)", affects=RUNTIME)
    qos: str = option("", "SLURM quality of service (empty: none)", affects=RUNTIME)
    constraint: str = option("", "SLURM node constraint, e.g. 'a100|h100' (empty: none)", affects=RUNTIME)
    exclusive: bool = option(False, "every stage gets whole nodes (--exclusive)", affects=RUNTIME)
    sbatch_flags: list[str] = option([], "extra sbatch options for every stage, e.g. ['--reservation=big', "
                                     "'--mail-type=FAIL']", affects=RUNTIME)
    setup: list[str] = option([], "shell lines run in each job before the stage (module load ..., conda activate "
                              "...): trusted code from your config, pasted as written", affects=RUNTIME)
    signal_delay_s: int = option(120, "seconds before the time limit at which the job is signalled to checkpoint "
                                 "and requeue (--signal=USR2@N for tessera submit, B:USR1@N for the sbatch scripts)",
                                 ge=0, affects=RUNTIME)
    max_requeues: int = option(5, "a stage's job requeues itself at most this many times (preemption or time "
                               "limit); then it fails", ge=0, affects=RUNTIME)
    collective_timeout_s: int = option(1800, "seconds a rank waits at the rendezvous or in one collective (gloo / "
                                       "NCCL) before it fails: a dead or hung node ends the job after this "
                                       "long instead of holding the others forever", ge=10, affects=RUNTIME)
    shard: Resources = option(Resources(), "resources of the shard stage", affects=RUNTIME)
    train_tokenizer: Resources = option(Resources(gpus_per_node=4, time_min=1440), "resources of train_tokenizer",
                                        affects=RUNTIME)
    precompute_codes: Resources = option(Resources(gpus_per_node=1, time_min=240), "resources of precompute_codes",
                                         affects=RUNTIME)
    train_prior: Resources = option(Resources(nodes=2, gpus_per_node=8, time_min=2880), "resources of train_prior",
                                    affects=RUNTIME)
    sample: Resources = option(Resources(gpus_per_node=8, time_min=480), "resources of sample", affects=RUNTIME)
    score: Resources = option(Resources(gpus_per_node=1, time_min=60), "resources of score", affects=RUNTIME)

    def validate(self, path: str) -> None:
        _check_sbatch_flags(self.sbatch_flags, f"{path}.sbatch_flags")
