"""Stage `shard`: images (ImageFolder tree, the embedded synthetic set, or an existing webdataset
shard set) -> webdataset/MDS shards plus RUN_DIR/shard/manifest.json and rejected.jsonl.

1. Plan: the source's splits cut into shards of a size fixed by the config alone (`plan_shards`),
   so every shard's bytes are the same however the stage is launched.
2. Work: worker w of W (array tasks x ranks) writes shards w, w+W, ... (pipeline.runner.units), decoding
   and encoding images in a pool of forked processes; unreadable images are skipped and listed.
   A webdataset source (pipeline/data/wds_source.py) is planned per input shard instead: unit j
   is input shard j resharded to our shard j, or (data.wds_mode=index) a record of it, the
   manifest then naming the input URLs.
3. Finish: the task that finds every shard present checks the reject fraction and writes
   rejected.jsonl, then manifest.json last (under torchrun: rank 0 after a barrier).
"""
from __future__ import annotations

import hashlib

from pipeline.data import manifest as manifest_lib
from pipeline.data.shards import encode_loaded, plan_shards, samples_per_shard, write_shard
from pipeline.data.sources import make_source
from pipeline.runner.stage import StageContext, StageError, StageResult
from pipeline.runner.units import MANIFEST_NAME, items_and_rate, publish_unit, run_units
from pipeline.runtime.cpus import usable_cpus
from pipeline.runtime.io import atomic_write_text, json_bytes, sha256_json
from pipeline.runtime.pools import end_pool, forked_pool

NAME = "shard"
INPUTS: dict = {}  # the first stage: its inputs are the source's images (external_inputs)
# Config fields that change the shard bytes; the reader-only ones (hflip, num_workers...) do not.
SHARD_FIELDS = ("source", "root", "resolution", "num_classes", "num_train", "num_val", "val_fraction", "format",
                "image_encoding", "synthetic_style", "wds_train", "wds_val", "wds_image_key", "wds_label_key",
                "wds_mode")
LOAD_CHUNK = 32  # images decoded/rendered per pool task (bounds memory, keeps numpy batched)


def external_inputs(ctx: StageContext) -> dict[str, str]:
    return make_source(ctx.cfg.data, ctx.cfg.seed).fingerprint()


def verify_outputs(stage_dir) -> None:
    """Every shard against the manifest (a missing or altered one is named)."""
    manifest_lib.verify_shards(stage_dir / MANIFEST_NAME)


def run(ctx: StageContext) -> StageResult | None:
    data = ctx.cfg.data
    source = make_source(data, ctx.cfg.seed)
    processes = data.shard_decode_processes or default_decode_processes()
    plan_fields = {"seed": ctx.cfg.seed, "inputs": source.fingerprint(),
                   **{name: getattr(data, name) for name in SHARD_FIELDS}}
    if source.kind == "webdataset":
        # An existing webdataset shard set: one unit per input shard (resharded, or indexed).
        from pipeline.data.wds_source import ShardSetWriter

        plan, plan_id = source.plan(data.format), sha256_json(plan_fields)
        ctx.logger.info("shard plan (webdataset source, %s): %d input shard(s) %s", data.wds_mode, len(plan),
                        {k: len(v) for k, v in source.urls.items()})
        writer = ShardSetWriter(source, data.format, data.image_encoding, processes)

        def write_one(unit, bar):  # the plan's units are input shards: the bar counts shards here
            sidecar = publish_unit(ctx.stage_dir, unit, plan_id, lambda path: writer.write(unit, path))
            bar.update(1)
            return sidecar
    else:
        per_shard = samples_per_shard(data.resolution, data.shard_max_count, data.shard_max_bytes)
        plan, plan_id = plan_shards(source.split_sizes, per_shard, data.format), sha256_json(
            {**plan_fields, "per_shard": per_shard})
        ctx.logger.info("shard plan: %d shard(s) of %s for %s", len(plan), data.format, source.split_sizes)
        warn_about_classes(source, data, ctx.logger)
        writer = _EncodePool(source, processes)

        def write_one(unit, bar):
            chunks = [(unit.split, lo, min(unit.stop, lo + LOAD_CHUNK), data.image_encoding)
                      for lo in range(unit.start, unit.stop, LOAD_CHUNK)]
            encoded = _counted(writer.imap(chunks), bar)
            return publish_unit(ctx.stage_dir, unit, plan_id,
                                lambda path: write_shard(path, encoded, fmt=data.format, encoding=data.image_encoding))

    def summarize(summary: dict, all_stats: list[dict]) -> StageResult:
        images_now, rate = items_and_rate(all_stats)
        ctx.logger.info("shard: manifest written: %s", summary["counts"])
        return StageResult(counts=summary["counts"], outputs=summary["outputs"],
                           metrics={"images_written_this_run": images_now, "images_per_s": round(rate, 1)})

    with writer:
        return run_units(ctx, plan, plan_id, desc="shard", write_one=write_one, summarize=summarize,
                         finalize=lambda sidecars: finalize(ctx, source, plan, plan_id, sidecars))


def finalize(ctx: StageContext, source, plan: list, plan_id: str, sidecars: list[dict]) -> dict:
    """Write rejected.jsonl and manifest.json (rank 0); fail when too many inputs were unreadable.

    The manifest is not written on failure, so a later stage never reads a dataset that failed
    its reject check; rejected.jsonl is, for inspection.
    """
    data = ctx.cfg.data
    rejected = manifest_lib.rejected_lines(plan, sidecars)
    if source.kind == "webdataset":
        from pipeline.data.wds_source import split_inputs

        inputs = split_inputs(plan, sidecars)
    else:
        inputs = source.split_sizes
    manifest = manifest_lib.build_manifest(
        plan, sidecars, source_kind=source.kind, class_names=source.class_names, resolution=data.resolution,
        fmt="webdataset" if source.kind == "webdataset" and data.wds_mode == "index" else data.format,
        encoding=data.image_encoding, split_inputs=inputs, plan_id=plan_id)
    if source.kind == "webdataset":
        manifest = source.annotate_manifest(manifest, plan, sidecars)
    totals = manifest["totals"]
    fraction = totals["rejected"] / max(totals["inputs"], 1)
    rejected_path = ctx.stage_dir / manifest_lib.REJECTED_NAME
    if fraction > data.max_reject_fraction:
        atomic_write_text(rejected_path, rejected)  # kept for inspection; no manifest, so the data cannot be used
        examples = "; ".join(f"{s['rejected'][0]['path']} ({s['rejected'][0]['reason']})"
                             for s in sidecars if s["rejected"])
        raise StageError(
            f"shard: {totals['rejected']} of {totals['inputs']} input images ({fraction:.1%}) are unreadable, "
            f"more than data.max_reject_fraction={data.max_reject_fraction}; see {rejected_path} "
            f"(e.g. {examples[:500]}). Fix or remove them, or raise data.max_reject_fraction.")
    manifest_lib.remember_verified(ctx.stage_dir, manifest)
    manifest_lib.write_manifest(ctx.stage_dir, manifest, rejected)
    counts = {"shards": totals["shards"], "images": totals["samples"], "inputs": totals["inputs"],
              "rejected": totals["rejected"], "bytes": totals["bytes"],
              **{f"{split}_images": info["num_samples"] for split, info in manifest["splits"].items()}}
    # Hashes of the exact bytes written (canonical JSON), so later stages can check their inputs.
    outputs = {MANIFEST_NAME: hashlib.sha256(json_bytes(manifest)).hexdigest(),
               manifest_lib.REJECTED_NAME: hashlib.sha256(rejected.encode("utf-8")).hexdigest()}
    return {"counts": counts, "outputs": outputs}


def warn_about_classes(source, data, logger) -> None:
    """An ImageFolder tree with one class, or another class count than the config's, is accepted
    (it may be intended) but said out loud: it is usually the wrong --root level."""
    found = len(source.class_names)
    if source.kind != "imagefolder":
        return
    if found == 1:
        logger.warning("data.root %s has a single class folder (%s): every image gets label 0; is data.root one "
                       "level too deep?", data.root, source.class_names[0])
    elif found != data.num_classes:
        logger.warning("data.root %s has %d class folders but data.num_classes is %d; labels follow the folders "
                       "(set data.num_classes=%d to silence this)", data.root, found, data.num_classes, found)


def default_decode_processes() -> int:
    """The CPU cores this process may use, shared among the ranks on this node."""
    return usable_cpus()


_POOL_SOURCE = None  # the source, inherited by forked decode processes instead of pickled per task


class _EncodePool:
    """Decode + encode image chunks in forked processes (or inline with one process). `imap`
    keeps chunk order, so the shard bytes do not depend on the process count."""

    def __init__(self, source, processes: int):
        self.source, self.processes, self.pool = source, processes, None

    def __enter__(self) -> "_EncodePool":
        global _POOL_SOURCE
        _POOL_SOURCE = self.source
        return self

    def __exit__(self, exc_type, *exc) -> None:
        global _POOL_SOURCE
        end_pool(self.pool, failed=exc_type is not None)
        _POOL_SOURCE = None

    def imap(self, chunks):
        if self.processes == 1:
            return map(_encode_chunk, chunks)
        if self.pool is None:  # started on first use: a rerun that keeps every shard forks nothing
            # fork: children inherit the source (an ImageNet file list is large to pickle).
            self.pool = forked_pool(self.processes)
        return self.pool.imap(_encode_chunk, chunks)


def _encode_chunk(task) -> list:
    split, start, stop, encoding = task
    return [encode_loaded(img, encoding) for img in _POOL_SOURCE.load(split, start, stop)]


def _counted(chunk_results, bar):
    for chunk in chunk_results:
        yield from chunk
        bar.update(len(chunk))
