"""Webdataset shard sets as a source (local path, `pipe:` and https URLs), the stream reader, and
training from URLs: bitwise equal to the local-path run, exact mid-epoch resume."""
import http.server
import io
import json
import ssl
import subprocess
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from testkit import TINY_TOKENIZER

from pipeline.config.root import load_config
from pipeline.data.manifest import ShardIntegrityError, load_manifest
from pipeline.data.reader import ShardedImageDataset, make_image_loader
from pipeline.data.urls import FetchOptions, ShardFetchError, read_shard_samples
from pipeline.runner.stage import StageError, run_stage

pytestmark = pytest.mark.e2e  # whole shard / train_tokenizer stages, torchrun

TINY = ["data.num_workers=2", *TINY_TOKENIZER, "data.shard_max_count=16"]  # 64 train images: 4 shards of 16
TRAIN = ["tokenizer_train.steps=6", "tokenizer_train.checkpoint_every=3", "tokenizer_train.eval_images=8"]


def cfg(*overrides):
    return load_config("configs/demo-rq.yaml", [*TINY, *overrides])


def index_overrides(train: str, val: str, *extra):
    return ["data.source=webdataset", f"data.wds_train={train}", f"data.wds_val={val}", "data.wds_image_key=png",
            "data.wds_mode=index", *extra]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo shards written by the shard stage (our writer); the webdataset sets below point at them."""
    run_dir = tmp_path_factory.mktemp("demo")
    run_stage("shard", cfg(), run_dir)
    return run_dir / "shard"


def patterns(shard_dir: Path, prefix: str = "") -> tuple[str, str]:
    return (f"{prefix}{shard_dir}/train/train-{{000000..000003}}.tar", f"{prefix}{shard_dir}/val/val-000000.tar")


@pytest.fixture(scope="module")
def https_server(demo, tmp_path_factory):
    """The demo shard folder over https on 127.0.0.1, with a self-signed certificate made here."""
    certs = tmp_path_factory.mktemp("certs")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(certs / "key.pem"),
                    "-out", str(certs / "cert.pem")], check=True, capture_output=True)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kw):
            super().__init__(*args, directory=str(demo), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "cert.pem", certs / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", certs / "cert.pem"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def pipe_index(demo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipe")
    run_stage("shard", cfg(*index_overrides(*patterns(demo, "pipe:cat "))), run_dir)
    return run_dir / "shard"


def test_tar_writer_gives_the_bytes_of_fixed_header_tarfile(demo, tmp_path):
    """webdataset's TarWriter (with our headers) writes what tarfile with fixed headers writes."""
    manifest, _ = load_manifest(demo)
    shard = demo / manifest["splits"]["val"]["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    rebuilt = tmp_path / "rebuilt.tar"
    with tarfile.open(rebuilt, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    assert [n for n, _ in members][:3] == ["val_00000000.cls", "val_00000000.json", "val_00000000.png"]
    assert rebuilt.read_bytes() == shard.read_bytes()


def test_index_lists_urls_without_copying(demo, pipe_index):
    manifest, _ = load_manifest(pipe_index)
    ours, _ = load_manifest(demo)
    train = manifest["splits"]["train"]
    assert [s["url"] for s in train["shards"]] == [f"pipe:cat {demo}/train/train-{i:06d}.tar" for i in range(4)]
    # The stream's hash is the file's: the same shards, named by URL.
    assert [s["sha256"] for s in train["shards"]] == [s["sha256"] for s in ours["splits"]["train"]["shards"]]
    assert train["num_samples"] == 64 and manifest["webdataset_source"]["image_key"] == "png"
    assert not list(pipe_index.glob("train/*.tar"))
    with pytest.raises(ShardIntegrityError, match="can only be streamed"):  # no random access
        ShardedImageDataset(pipe_index, "train")


def _keys(loader):
    return [key for batch in loader for key in batch.keys]


def test_stream_ranks_without_a_batch_are_an_error_not_a_hang(pipe_index):
    with pytest.raises(StageError, match="rank 4 of 5 got no full batch of 8 .* 4 shard"):
        list(make_image_loader(pipe_index, "train", 8, rank=4, world_size=5, drop_last=True))


def test_stream_ranks_cover_the_split_without_overlap(pipe_index):
    ranks = [_keys(make_image_loader(pipe_index, "train", 8, rank=r, world_size=3, seed=5)) for r in range(3)]
    assert not set(ranks[0]) & set(ranks[1]) and not set(ranks[1]) & set(ranks[2]) and not set(ranks[0]) & set(ranks[2])
    assert sorted(sum(ranks, [])) == [f"train_{i:08d}" for i in range(64)]
    one = make_image_loader(pipe_index, "train", 8, seed=5)
    epoch0, epoch1 = _keys(one), _keys(one)
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)  # shard and in-shard order are seeded per epoch
    assert _keys(make_image_loader(pipe_index, "train", 8, seed=5)) == epoch0


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_mid_epoch_is_exact(pipe_index, workers):
    options = dict(seed=3, random_crop=True, hflip=True, num_workers=workers, drop_last=True)
    full = make_image_loader(pipe_index, "train", 4, **options)
    full.set_epoch(1)
    reference = list(full)
    first = make_image_loader(pipe_index, "train", 4, **options)
    first.set_epoch(1)
    iterator = iter(first)
    head = [next(iterator) for _ in range(7)]  # 28 samples: one shard and a part of another
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    del iterator
    assert state["epoch"] == 1 and 0 < sum(state["consumed"].values()) and any(
        0 < n < 16 for n in state["consumed"].values())
    resumed = make_image_loader(pipe_index, "train", 4, **options)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert resumed.state_dict()["epoch"] == 2
    assert [b.keys for b in head + tail] == [b.keys for b in reference]
    for got, want in zip(head + tail, reference):
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)


def _png(size=16, value=0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_set(folder: Path, samples: list[dict]) -> str:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / "set-000000.tar"), encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
    return str(folder / "set-{000000..000000}.tar")


def test_corrupt_samples_are_skipped_and_listed(tmp_path):
    # The image member has its own name ("img"): index mode serves it, reshard writes our "png".
    good = [{"__key__": f"s{i}", "img": _png(16, 20 * i), "cls": str(i % 3).encode()} for i in range(6)]
    bad = [{"__key__": "truncated", "img": _png()[:40], "cls": b"1"},
           {"__key__": "nolabel", "img": _png(), "cls": b"x"},
           {"__key__": "outofrange", "img": _png(), "cls": b"7"},
           {"__key__": "noimage", "jpg": b"...", "cls": b"1"}]
    pattern = _write_set(tmp_path / "set", good[:3] + bad + good[3:])
    base = ["data.source=webdataset", f"data.wds_train={pattern}", "data.wds_image_key=img", "data.num_classes=3",
            "data.resolution=16", "data.max_reject_fraction=0.5"]
    for mode, fmt, reader in (("index", "webdataset", "stream"), ("reshard", "webdataset", "stream"),
                              ("reshard", "mds", "indexed")):
        run_dir = tmp_path / f"{mode}-{fmt}"
        outcome = run_stage("shard", load_config(None, [*base, f"data.wds_mode={mode}", f"data.format={fmt}"]), run_dir)
        assert outcome.record["counts"]["rejected"] == 4 and outcome.record["counts"]["images"] == 6
        lines = [json.loads(line) for line in (run_dir / "shard/rejected.jsonl").read_text().splitlines()]
        assert [e["path"].rsplit("#", 1)[1] for e in lines] == ["truncated", "nolabel", "outofrange", "noimage"]
        assert all(e["reason"] for e in lines)
        batches = list(make_image_loader(run_dir / "shard", "train", 4, shuffle=False, reader=reader))
        assert sum(len(b.keys) for b in batches) == 6
        assert torch.cat([b.labels for b in batches]).tolist() == [i % 3 for i in range(6)]
        assert torch.equal(batches[0].images[1], torch.full((3, 16, 16), 20 / 127.5 - 1.0))  # sample s1's pixels


def test_index_mode_refuses_images_of_another_size(tmp_path):
    pattern = _write_set(tmp_path / "set", [{"__key__": "big", "png": _png(24), "cls": b"0"}])
    with pytest.raises(StageError, match=r"sample big of .* is 24x24, not 16x16.*wds_mode=reshard"):
        run_stage("shard", load_config(None, ["data.source=webdataset", f"data.wds_train={pattern}",
                                              "data.wds_image_key=png", "data.resolution=16",
                                              "data.wds_mode=index"]), tmp_path / "run")


def test_unreadable_shard_is_retried_then_named(demo, tmp_path):
    missing = f"pipe:cat {tmp_path}/nowhere.tar"
    with pytest.raises(ShardFetchError, match=r"could not read shard pipe:cat .*nowhere.tar after 3 attempt\(s\)"):
        list(read_shard_samples(missing, FetchOptions(retries=2, retry_delay_s=0.01)))
    # A stream that breaks once (half a shard, then a failing exit) is read again from the start and
    # continues after the last sample it delivered.
    shard = demo / "train/train-000000.tar"
    flag = tmp_path / "failed-once"
    flaky = (f"pipe:if [ -e {flag} ]; then cat {shard}; else touch {flag}; head -c 20000 {shard}; exit 1; fi")
    keys = [s["__key__"] for s in read_shard_samples(flaky, FetchOptions(retries=1, retry_delay_s=0.01))]
    assert flag.exists() and keys == [s["__key__"] for s in read_shard_samples(str(shard), FetchOptions())]


def test_https_needs_the_ca_and_is_never_unverified(https_server, tmp_path):
    base, cert = https_server
    url = f"{base}/val/val-000000.tar"
    with pytest.raises(ShardFetchError, match=f"could not read shard {url}"):
        list(read_shard_samples(url, FetchOptions(retries=0)))  # self-signed: refused without its CA
    assert len(list(read_shard_samples(url, FetchOptions(retries=0, ca_bundle=str(cert))))) == 16
    with pytest.raises(ShardFetchError, match="val-999999.tar"):
        list(read_shard_samples(f"{base}/val/val-999999.tar", FetchOptions(retries=1, retry_delay_s=0.01,
                                                                           ca_bundle=str(cert))))


def _train(run_dir: Path, *overrides):
    outcome = run_stage("train_tokenizer", cfg(*overrides, *TRAIN), run_dir)
    assert outcome.status == "done"
    return load_file(str(run_dir / "train_tokenizer/tokenizer.safetensors"))


def test_tokenizer_from_pipe_and_https_equals_local_path_and_resumes_exactly(demo, https_server, tmp_path,
                                                                             monkeypatch):
    base, cert = https_server
    sources = {"local": index_overrides(*patterns(demo)),
               "pipe": index_overrides(*patterns(demo, "pipe:cat ")),
               "https": index_overrides(f"{base}/train/train-{{000000..000003}}.tar", f"{base}/val/val-000000.tar",
                                        f"data.ca_bundle={cert}")}
    results = {}
    for name, overrides in sources.items():
        run_stage("shard", cfg(*overrides), tmp_path / name)
        results[name] = _train(tmp_path / name, *overrides)
    for name in ("pipe", "https"):
        assert results[name].keys() == results["local"].keys()
        assert all(torch.equal(results[name][k], results["local"][k]) for k in results["local"]), name

    # Interrupted after step 4 (last checkpoint: step 3, 24 of 64 images: mid-shard, mid-epoch), then resumed.
    from pipeline.train import tokenizer_trainer

    overrides = sources["https"]
    run_dir = tmp_path / "resumed"
    run_stage("shard", cfg(*overrides), run_dir)
    real_step = tokenizer_trainer.TokenizerTrainer.train_step

    def crash_after_step_4(self):
        logs = real_step(self)
        if self.step == 4:
            raise RuntimeError("node lost")
        return logs

    monkeypatch.setattr(tokenizer_trainer.TokenizerTrainer, "train_step", crash_after_step_4)
    with pytest.raises(RuntimeError, match="node lost"):
        run_stage("train_tokenizer", cfg(*overrides, *TRAIN), run_dir)
    monkeypatch.setattr(tokenizer_trainer.TokenizerTrainer, "train_step", real_step)
    state = torch.load(run_dir / "train_tokenizer/checkpoints/step_00000003/client_rank_00000.pt",
                       weights_only=True)["loader"]
    assert state["epoch"] == 0 and sum(state["consumed"].values()) == 24 and state["next_worker"] == 1
    resumed = _train(run_dir, *overrides)
    assert "resumed from checkpoint at step 3" in (run_dir / "train_tokenizer/log.txt").read_text()
    assert all(torch.equal(resumed[k], results["local"][k]) for k in results["local"])


def test_two_ranks_index_and_train_from_a_pipe_url(demo, tmp_path):
    """Under torchrun: both ranks index input shards, then train on disjoint shards of the URL set."""
    from testkit import tessera

    train, val = patterns(demo, "pipe:cat ")
    tessera("run", "configs/demo-rq.yaml", "--run-dir", str(tmp_path), "--stages", "shard,train_tokenizer", *TINY,
            *index_overrides(train, val), "tokenizer_train.steps=4", "tokenizer_train.checkpoint_every=2",
            "tokenizer_train.eval_images=8", nproc=2)
    assert json.loads((tmp_path / "train_tokenizer/done.json").read_text())["counts"]["steps"] == 4
    states = [torch.load(tmp_path / f"train_tokenizer/checkpoints/step_00000004/client_rank_{r:05d}.pt",
                         weights_only=False)["loader"] for r in (0, 1)]
    shards = [{int(k) for k in state["consumed"]} for state in states]
    assert all(sum(s["consumed"].values()) == 16 for s in states)  # 4 steps x 4 images per rank
    assert shards[0] and shards[1] and not shards[0] & shards[1]


def test_indexed_urls_feed_precompute_codes_and_the_rfid_reference(demo, pipe_index, tmp_path):
    """Stages that read every image once (precompute_codes, the Inception references) stream each
    indexed shard front to back: the same images, keys and labels as our own shards in order."""
    import shutil

    from pipeline.data.stream_reader import shard_batches

    ours = ShardedImageDataset(demo, "train")
    for position in range(4):
        for j, (images, labels, keys) in enumerate(shard_batches(pipe_index, "train", position, 8)):
            for k in range(len(keys)):
                image, label, key = ours[position * 16 + j * 8 + k]
                assert key == keys[k] and label == int(labels[k]) and torch.equal(image, images[k])
    run_dir = tmp_path / "run"
    shutil.copytree(pipe_index.parent, run_dir)
    overrides = index_overrides(*patterns(demo, "pipe:cat "), "tokenizer_train.rfid_images=8",
                                "score.download_weights=false", "precompute.batch_size=8")
    _train(run_dir, *overrides)
    assert json.loads((run_dir / "train_tokenizer/done.json").read_text())["metrics"]["rfid_images"] == 8
    assert run_stage("precompute_codes", cfg(*overrides, *TRAIN), run_dir).status == "done"
    done = json.loads((run_dir / "precompute_codes/done.json").read_text())
    assert done["counts"]["images"] == 80 and done["metrics"]["verify_token_mismatch"] == 0, done
