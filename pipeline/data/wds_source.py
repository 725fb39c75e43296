"""An existing webdataset shard set as the shard stage's source, one input shard per unit of work.

    source = WebDatasetSource(cfg.data)          # data.wds_train / wds_val brace patterns
    plan = source.plan(cfg.data.format)          # unit j of a split <-> input shard j of that split
    with ShardSetWriter(source, fmt, encoding, processes) as writer:
        sidecar_fields = writer.write(unit, path)

data.wds_mode=reshard: unit j is our shard j (tar or MDS), the input shard's images decoded,
resized + centre-cropped to data.resolution and re-encoded, keys "<split>_<j:06d>_<i:06d>". Our
shards then follow the input shards' sizes (data.shard_max_count / max_bytes do not cut them).
data.wds_mode=index: unit j is a small JSON record of input shard j (URL, sha256 and bytes of its
stream, usable samples, keys of corrupt samples); the manifest then names the URLs and nothing is
copied. Every image must already be data.resolution square (checked: each image is decoded once).

Either way each input shard is read once per pass through urls.read_shard_samples (retries, then
an error naming the URL), and a corrupt sample (image that does not decode, missing member, label
that is not an integer in [0, num_classes)) is skipped and listed in rejected.jsonl as
"<url>#<key>", like an unreadable ImageFolder file. Class names are "0".."num_classes-1".
"""
from __future__ import annotations

import io
import warnings

from PIL import Image

from ..runner.units import Unit
from ..runtime.errors import StageError
from ..runtime.io import atomic_write_json, sha256_json
from ..runtime.pools import end_pool, forked_pool
from .images import LoadedImage, center_crop_resize
from .shards import encode_loaded, write_shard
from .stream_reader import webdataset_label
from .urls import expand_shard_urls, fetch_options, read_shard_samples

INDEX_SUFFIX = ".index.json"


class WebDatasetSource:
    kind = "webdataset"

    def __init__(self, data_cfg):
        self.data = data_cfg
        self.urls = {"train": expand_shard_urls(data_cfg.wds_train)}
        if data_cfg.wds_val:
            self.urls["val"] = expand_shard_urls(data_cfg.wds_val)
        self.class_names = [str(i) for i in range(data_cfg.num_classes)]
        self.image_key, self.label_key, self.mode = data_cfg.wds_image_key, data_cfg.wds_label_key, data_cfg.wds_mode

    def fingerprint(self) -> dict:
        """The expanded URL lists (the shards' contents are hashed into the manifest as they are read)."""
        return {"webdataset_urls": sha256_json(self.urls)}

    def plan(self, fmt: str) -> list[Unit]:
        suffix = INDEX_SUFFIX if self.mode == "index" else (".tar" if fmt == "webdataset" else "")
        return [Unit(split, j, j, j + 1, f"{split}/{split}-{j:06d}{suffix}")
                for split, urls in self.urls.items() for j in range(len(urls))]

    def url_of(self, unit: Unit) -> str:
        return self.urls[unit.split][unit.index]

    def annotate_manifest(self, manifest: dict, plan: list[Unit], sidecars: list[dict]) -> dict:
        """Index mode: the manifest lists the input shards by URL, with their own hashes and skips."""
        manifest["webdataset_source"] = {"mode": self.mode, "image_key": self.image_key, "label_key": self.label_key}
        if self.mode != "index":  # resharded: our own shards, with our members (png/jpg + cls)
            return manifest
        by_split = {}
        for unit, sidecar in zip(plan, sidecars):
            by_split.setdefault(unit.split, []).append(
                {"name": sidecar["url"], "url": sidecar["url"], "count": sidecar["count"],
                 "sha256": sidecar["source_sha256"], "bytes": sidecar["source_bytes"], "skip": sidecar["skip"]})
        for split, shards in by_split.items():
            manifest["splits"][split]["shards"] = shards
        manifest["image_encoding"] = self.image_key
        manifest["totals"]["bytes"] = sum(s["bytes"] for shards in by_split.values() for s in shards)
        return manifest


def split_inputs(plan: list[Unit], sidecars: list[dict]) -> dict[str, int]:
    """Samples read per split (usable + rejected), from the units' sidecars."""
    inputs: dict[str, int] = {}
    for unit, sidecar in zip(plan, sidecars):
        inputs[unit.split] = inputs.get(unit.split, 0) + sidecar["count"] + len(sidecar["rejected"])
    return inputs


def _decode(sample: dict, image_key: str, label_key: str, num_classes: int) -> tuple[Image.Image, int]:
    """(RGB image, label) of a webdataset sample; raises for a corrupt one."""
    if image_key not in sample:
        raise KeyError(f"no '{image_key}' member (has {sorted(k for k in sample if not k.startswith('__'))})")
    label = webdataset_label(sample, label_key)
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} is not in [0, data.num_classes={num_classes})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(sample[image_key])) as image:
            image.load()  # decode now: truncated data surfaces here
            return image.copy(), label


def _process(task) -> tuple:
    """One sample in a pool process: ('ok', label, loaded+encoded) or ('reject', reason) or ('size', w, h)."""
    sample, split, name, origin, j, i, options = task
    image_key, label_key, num_classes, resolution, mode, encoding = options
    try:
        image, label = _decode(sample, image_key, label_key, num_classes)
    except Exception as err:  # noqa: BLE001 -- any decoder failure is a rejected sample, not a crash
        return ("reject", f"{type(err).__name__}: {err}")
    if mode == "index":
        if image.size != (resolution, resolution):
            return ("size", *image.size)
        return ("ok", label, None)
    pixels = center_crop_resize(image, resolution)
    return ("ok", label, encode_loaded(LoadedImage(split, i, label, origin, pixels, name=name), encoding))


class ShardSetWriter:
    """Writes the units of a WebDatasetSource plan; samples are decoded in a pool of forked processes
    (`imap` keeps their order, so the output does not depend on the process count)."""

    def __init__(self, source: WebDatasetSource, fmt: str, encoding: str, processes: int):
        self.source, self.fmt, self.encoding, self.processes = source, fmt, encoding, processes
        self.pool = None

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        end_pool(self.pool, failed=exc_type is not None)

    def _map(self, tasks):
        if self.processes == 1:
            return map(_process, tasks)
        if self.pool is None:
            self.pool = forked_pool(self.processes)
        return self.pool.imap(_process, tasks, chunksize=8)

    def write(self, unit: Unit, path) -> dict:
        source, url = self.source, self.source.url_of(unit)
        data = source.data
        options = (source.image_key, source.label_key, data.num_classes, data.resolution, source.mode, self.encoding)
        digest: list = []
        keys: list[str] = []

        def tasks():
            for i, sample in enumerate(read_shard_samples(url, fetch_options(), digest=digest)):
                keys.append(sample["__key__"])
                name = f"{unit.split}_{unit.index:06d}_{i:06d}"
                yield ({k: v for k, v in sample.items() if k != "__url__"}, unit.split, name,
                       f"{url}#{sample['__key__']}", unit.index, i, options)

        rejected, skip = [], []

        def accepted():
            for i, result in enumerate(self._map(tasks())):
                if result[0] == "size":
                    raise StageError(f"data.wds_mode=index: sample {keys[i]} of {url} is {result[1]}x{result[2]}, "
                                     f"not {data.resolution}x{data.resolution}: index mode serves images as stored; "
                                     f"use data.wds_mode=reshard to resize/crop them into our own shards")
                if result[0] == "reject":
                    rejected.append({"path": f"{url}#{keys[i]}", "reason": result[1]})
                    skip.append(keys[i])
                    continue
                yield result[2]  # reshard: (image, encoded bytes); index: None

        if source.mode == "index":
            count = sum(1 for _ in accepted())
            sha, size = digest[0]
            record = {"url": url, "count": count, "source_sha256": sha, "source_bytes": size, "skip": skip}
            atomic_write_json(path, record)
            return {**record, "rejected": rejected}
        # Reshard: streamed into our shard as the pool returns them.
        fields = write_shard(path, accepted(), fmt=self.fmt, encoding=self.encoding)
        return {"count": fields["count"], "rejected": rejected, "url": url}
