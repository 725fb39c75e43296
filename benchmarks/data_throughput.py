"""Benchmark: images/s reading shards (decode + random crop + flip to float tensors), per reader and
DataLoader worker count, at 64 and 256 px.

    python benchmarks/data_throughput.py [--num-64 4000] [--num-256 800] [--workers 0,1,2] [--out FILE]

Writes benchmarks/results/data_throughput.json, a section of BENCHMARKS.md (benchmarks/report.py).

Readers: the indexed reader over our webdataset tars and over MDS (streaming's LocalDataset), the
stream reader (webdataset pipeline) over the same tars by local path and through `pipe:cat` URLs,
and webdataset's own pipeline (`WebDataset(...).decode("rgb8")`, no augmentation) as the raw
decode rate. Shards are written first by the shard stage (synthetic 'textures' images, PNG).
Per core = images/s / max(1, workers): the main process only collates in the worker runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from pipeline.config.root import load_config  # noqa: E402
from pipeline.data.manifest import load_manifest  # noqa: E402
from pipeline.data.reader import make_image_loader  # noqa: E402
from pipeline.runner.stage import run_stage  # noqa: E402

from report import RESULTS, command_line, describe_machine, markdown_table, write_section  # noqa: E402

BATCH = 64


def section(rows: list[dict], command: str, machine: str) -> dict:
    """The BENCHMARKS.md section: images/s per core, one row per reader, one column per px x workers."""
    columns = sorted({(r["resolution"], r["workers"]) for r in rows})
    table = []
    for reader in dict.fromkeys(r["reader"] for r in rows):
        cells = {(r["resolution"], r["workers"]): r for r in rows if r["reader"] == reader}
        table.append([reader] + [
            f"{cells[c]['images_per_s_per_core']:,.0f}" + (f" ({cells[c]['images_per_s']:,.0f})" if c[1] > 1 else "")
            if c in cells else "-" for c in columns])
    return {
        "title": "Data loading throughput",
        "order": 60,
        "measures": "Images/s per core reading one epoch of shards written by the shard stage (synthetic "
                    "`textures` PNG images, 100 per shard), decoding and applying random crop + flip to float "
                    "tensors in batches of 64, per reader and DataLoader worker count; the time includes "
                    "starting the workers. Per core = images/s / max(1, workers), the total in brackets.",
        "command": command,
        "machine": machine,
        "tables": [{"columns": ["reader"] + [f"{px} px, {w} worker(s)" for px, w in columns], "rows": table}],
        "data": {"rows": rows},
    }


def make_shards(root: Path, resolution: int, num: int, fmt: str) -> Path:
    run_dir = root / f"{fmt}-{resolution}"
    cfg = load_config(None, [f"data.resolution={resolution}", f"data.num_train={num}", "data.num_val=0",
                             "data.shard_max_count=100", f"data.format={fmt}", "data.synthetic_style=textures"])
    run_stage("shard", cfg, run_dir)
    return run_dir / "shard"


def index_urls(root: Path, tar_dir: Path, resolution: int, prefix: str) -> Path:
    manifest, _ = load_manifest(tar_dir)
    shards = manifest["splits"]["train"]["shards"]
    pattern = f"{prefix}{tar_dir}/train/train-{{000000..{len(shards) - 1:06d}}}.tar"
    run_dir = root / f"index-{prefix.strip(':') or 'path'}-{resolution}"
    cfg = load_config(None, [f"data.resolution={resolution}", "data.source=webdataset", f"data.wds_train={pattern}",
                             "data.wds_image_key=png", "data.wds_mode=index"])
    run_stage("shard", cfg, run_dir)
    return run_dir / "shard"


def time_loader(batches) -> tuple[int, float]:
    start = time.perf_counter()
    images = 0
    for batch in batches:
        images += len(batch[0])
    return images, time.perf_counter() - start


def ours(shard_dir: Path, workers: int, reader: str):
    return make_image_loader(shard_dir, "train", BATCH, seed=0, num_workers=workers, random_crop=True, hflip=True,
                             reader=reader)


def raw_webdataset(tar_dir: Path, workers: int):
    import webdataset as wds

    urls = sorted(str(p) for p in (tar_dir / "train").glob("*.tar"))

    def to_tensor(sample):
        image, label = sample
        return torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0), label

    dataset = (wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker, empty_check=False)
               .decode("rgb8")
               .to_tuple("png", "cls").map(to_tensor).batched(BATCH))
    if workers == 0:
        return dataset
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-64", type=int, default=4000)
    parser.add_argument("--num-256", type=int, default=800)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_throughput.json")
    args = parser.parse_args()
    workers_list = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tessera-throughput-") as tmp:
        root = Path(tmp)
        for resolution, num in ((64, args.num_64), (256, args.num_256)):
            tar_dir = make_shards(root, resolution, num, "webdataset")
            mds_dir = make_shards(root, resolution, num, "mds")
            path_index = index_urls(root, tar_dir, resolution, "")
            pipe_index = index_urls(root, tar_dir, resolution, "pipe:cat ")
            readers = {
                "indexed reader, webdataset tar": lambda w: ours(tar_dir, w, "indexed"),
                "indexed reader, MDS (streaming)": lambda w: ours(mds_dir, w, "indexed"),
                "stream reader, tar by path": lambda w: ours(path_index, w, "stream"),
                "stream reader, pipe:cat URL": lambda w: ours(pipe_index, w, "stream"),
                "webdataset decode only (no augment)": lambda w: raw_webdataset(tar_dir, w),
            }
            for name, make in readers.items():
                for workers in workers_list:
                    images, seconds = time_loader(make(workers))
                    rate = images / seconds
                    row = {"resolution": resolution, "reader": name, "workers": workers, "images": images,
                           "seconds": round(seconds, 3), "images_per_s": round(rate, 1),
                           "images_per_s_per_core": round(rate / max(1, workers), 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = section(rows, command_line("benchmarks/data_throughput.py"), describe_machine("cpu"))
    print(markdown_table(result["tables"][0]["columns"], result["tables"][0]["rows"]))
    write_section(args.out, result)

if __name__ == "__main__":
    main()
