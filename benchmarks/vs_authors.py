"""Tessera against the authors' code (kakaobrain/rq-vae-transformer) on the same work, on CPU.

    python benchmarks/vs_authors.py --authors-repo /work/authors/rq [--dq-repo DIR] [--rows a,b] [--threads 1] [--bf16]

Both sides get the same random weights (theirs built by their code, ours through Tessera's importer
of their checkpoints) and the same inputs. Before timing, every row checks that both compute the
same thing: codes equal, reconstructions / logits / losses within float tolerance, greedy samples
equal. Timing: one warm-up call per side, then `--repeats` rounds alternating the sides (theirs,
ours, theirs, ...; the order flips each round), median per side. The load average is recorded
before and after: the machine is shared, so compare rows measured under the same load.

Writes benchmarks/results/vs_authors.json and prints a markdown table. Never part of the tests;
their code is read from --authors-repo at run time and never copied into Tessera.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import authors_models as theirs_lib  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.generation.rq_sampler import sample_rq  # noqa: E402
from pipeline.generation.sampling import SamplingOptions  # noqa: E402
from pipeline.importers.rq_official import convert_stage1, read_stage1_config  # noqa: E402
from pipeline.importers.rq_official_prior import build_from_their_state, prior_config_from_yaml  # noqa: E402
from pipeline.losses.prior_loss import rq_prior_loss  # noqa: E402

import report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "vs_authors.json"
# Their ImageNet RQ-VAE (configs/imagenet256/stage1/in256-rqvae-8x8x4.yaml: ch 128, 2 res blocks,
# attention at 8x8, z 256, K 16384, shared codebook, depth 4) at 128 px: one level fewer
# (ch_mult [1,1,2,2,4], 16x downsampling) keeps the 8x8x4 code grid.
RQVAE = dict(resolution=128, ch_mult=[1, 1, 2, 2, 4], n_embed=16384, depth=4, attn_resolutions=[8])
PRIOR = dict(code_shape=[8, 8, 4], vocab=1024, embed_dim=256, n_head=4, body_layers=6, head_layers=2)
BATCH_RQVAE, BATCH_PRIOR_TRAIN = 4, 8


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def check(name: str, ok: bool, detail: str) -> None:
    if not ok:
        raise SystemExit(f"parity check failed ({name}): {detail}; the two sides do not compute the same thing")
    print(f"  parity {name}: {detail}", flush=True)


def time_pair(theirs, ours, repeats: int) -> tuple[float, float]:
    """Median seconds per call of each side: a warm-up each, then alternating rounds."""
    theirs(), ours()
    t_theirs, t_ours = [], []
    for r in range(repeats):
        order = [(theirs, t_theirs), (ours, t_ours)]
        for fn, out in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(t_theirs), statistics.median(t_ours)


# ---- RQ-VAE ----------------------------------------------------------------------------
def rqvae_pair(tmp: Path):
    config = theirs_lib.stage1_config(**RQVAE)
    their = theirs_lib.build_rqvae(config).eval()
    spec = read_stage1_config(theirs_lib.write_stage1_yaml(config, tmp / "config.yaml"))
    ours = convert_stage1(their.state_dict(), spec).eval()
    return their, ours


def bf16(fn):
    """fn under CPU bf16 autocast: what precision=bf16 runs (changes numerics; not the same work)."""
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()
    return run


def rqvae_rows(repeats: int, tmp: Path, with_bf16: bool) -> list[dict]:
    torch.manual_seed(0)
    their, ours = rqvae_pair(tmp)
    x = torch.rand(BATCH_RQVAE, 3, RQVAE["resolution"], RQVAE["resolution"]) * 2 - 1
    with torch.no_grad():
        codes_theirs, codes_ours = their.get_codes(x), ours.encode(x)
        check("rqvae encode", torch.equal(codes_theirs, codes_ours), f"codes {tuple(codes_ours.shape)} equal")
        rec_theirs, rec_ours = their.decode_code(codes_theirs), ours.decode(codes_theirs)
        check("rqvae decode", max_diff(rec_theirs, rec_ours) < 1e-4, f"max |diff| {max_diff(rec_theirs, rec_ours):.1e}")
    train_parity(their, ours, x)

    rows = []
    with torch.no_grad():
        t = time_pair(lambda: their.get_codes(x), lambda: ours.encode(x), repeats)
        rows.append(row("rqvae_encode", f"RQ-VAE encode to codes (batch {BATCH_RQVAE}, 128 px)", t, "s"))
        t = time_pair(lambda: their.decode_code(codes_theirs), lambda: ours.decode(codes_theirs), repeats)
        rows.append(row("rqvae_decode", f"RQ-VAE decode codes (batch {BATCH_RQVAE})", t, "s"))
    if with_bf16:  # before the training steps move either side's EMA codebook
        rows += rqvae_bf16_rows(their, ours, x, codes_theirs, rec_theirs, repeats)
    their.train(), ours.train()

    def their_step():
        out, quant_loss, code = their(x)
        their.compute_loss(out, quant_loss, code, xs=x)["loss_total"].backward()

    def our_step():
        recon, aux = ours(x)
        (F.mse_loss(recon, x) + aux.quant_loss).backward()

    t = time_pair(their_step, our_step, repeats)
    rows.append(row("rqvae_train_step", f"RQ-VAE training step (K=16384, 8x8x4, 128 px, batch {BATCH_RQVAE}; "
                                        f"recon + commitment, fwd + bwd)", t, "s"))
    if with_bf16:
        t = time_pair(their_step, bf16(our_step), repeats)
        rows.append(row("rqvae_train_step_bf16", "RQ-VAE training step, Tessera precision=bf16", t, "s", exact=False))
    return rows


def rqvae_bf16_rows(their, ours, x, codes_theirs, rec_theirs, repeats) -> list[dict]:
    """Tessera with precision=bf16 against the authors in fp32: how much faster, and how far from
    their results (code agreement, reconstruction error); informational, not parity rows."""
    rows = []
    with torch.no_grad():
        agree = float((bf16(lambda: ours.encode(x))() == codes_theirs).float().mean())
        t = time_pair(lambda: their.get_codes(x), bf16(lambda: ours.encode(x)), repeats)
        rows.append(row("rqvae_encode_bf16", f"RQ-VAE encode, Tessera precision=bf16 ({agree:.1%} of codes equal "
                                             f"to fp32)", t, "s", exact=False))
        err = max_diff(bf16(lambda: ours.decode(codes_theirs))(), rec_theirs)
        t = time_pair(lambda: their.decode_code(codes_theirs), bf16(lambda: ours.decode(codes_theirs)), repeats)
        rows.append(row("rqvae_decode_bf16", f"RQ-VAE decode, Tessera precision=bf16 (max abs diff {err:.2f} on "
                                             f"[-1, 1] pixels)", t, "s", exact=False))
    return rows


def train_parity(their, ours, x) -> None:
    """One training forward/backward from equal states (restarts off: they draw random vectors)."""
    their, ours = copy.deepcopy(their).train(), copy.deepcopy(ours).train()
    for book in their.quantizer.codebooks:
        book.restart_unused_codes = False
    ours.quantizer.dead_code_threshold = 0.0
    out, quant_loss, code = their(x)
    loss_theirs = their.compute_loss(out, quant_loss, code, xs=x)["loss_total"]
    recon, aux = ours(x)
    loss_ours = F.mse_loss(recon, x) + aux.quant_loss
    loss_theirs.backward(), loss_ours.backward()
    loss_theirs, loss_ours = float(loss_theirs.detach()), float(loss_ours.detach())
    g_theirs, g_ours = their.encoder.conv_in.weight.grad, ours.encoder.trunk.conv_in.weight.grad
    rel = max_diff(g_theirs, g_ours) / float(g_theirs.abs().max())
    check("rqvae train step", abs(loss_theirs - loss_ours) < 1e-5 and rel < 1e-3,
          f"loss {loss_theirs:.6f} vs {loss_ours:.6f}, conv_in grad rel. diff {rel:.1e}")


# ---- RQ-Transformer ----------------------------------------------------------------------
def prior_pair():
    arch = theirs_lib.stage2_config(**PRIOR)
    their = theirs_lib.build_rqtransformer(arch).eval()
    aux, bottleneck = theirs_lib.code_embedder(PRIOR["vocab"], PRIOR["code_shape"])
    cfg, spec = prior_config_from_yaml({"arch": arch})
    ours = build_from_their_state(their.state_dict(), cfg, spec, bottleneck.codebooks[0].weight[:-1].detach())
    return their, aux, ours


def prior_rows(repeats: int) -> list[dict]:
    torch.manual_seed(1)
    their, aux, ours = prior_pair()
    H, W, D = PRIOR["code_shape"]
    codes = torch.randint(0, PRIOR["vocab"], (BATCH_PRIOR_TRAIN, H, W, D))
    with torch.no_grad():
        diff = max_diff(their(codes, aux), ours(codes))
    check("prior logits", diff < 1e-4, f"teacher-forced logits max |diff| {diff:.1e}")
    with torch.no_grad():
        greedy_theirs = their.sample(torch.zeros(2, H, W, D, dtype=torch.long), aux, top_k=1)
        greedy_ours = sample_rq(ours, None, [0, 1], seed=0, opts=SamplingOptions(top_k=[1]))
    check("prior greedy sampling", torch.equal(greedy_theirs, greedy_ours), "greedy codes (batch 2) equal")

    rows = []
    for batch in (1, 16):
        zeros = torch.zeros(batch, H, W, D, dtype=torch.long)
        with torch.no_grad():
            t = time_pair(lambda: their.sample(zeros, aux), lambda: sample_rq(ours, None, range(batch), seed=0),
                          repeats)
        rows.append(row(f"sampling_b{batch}", f"KV-cached sampling, RQ-Transformer 256 wide, 6+2 layers, K=1024, "
                                              f"8x8x4, batch {batch}", t, "img/s", batch))
    their.train(), ours.train()

    def their_step():
        logits = their(codes, aux)
        their.compute_loss(logits, codes).backward()

    def our_step():
        rq_prior_loss(ours(codes), codes)[0].backward()

    t = time_pair(their_step, our_step, repeats)
    rows.append(row("prior_train_step", f"RQ-Transformer training step (batch {BATCH_PRIOR_TRAIN}, fwd + bwd)", t,
                    "s"))
    return rows


def row(key: str, work: str, times: tuple[float, float], unit: str, images: int = 1, exact: bool = True) -> dict:
    t_theirs, t_ours = times
    out = {"key": key, "work": work, "unit": unit, "authors_s": round(t_theirs, 4), "tessera_s": round(t_ours, 4),
           "speedup": round(t_theirs / t_ours, 2), "same_numerics": exact, "load_after": load_average()}
    if unit == "img/s":
        out["authors"], out["tessera"] = round(images / t_theirs, 3), round(images / t_ours, 3)
    print(f"  {key}: authors {t_theirs:.3f} s, Tessera {t_ours:.3f} s, {out['speedup']}x", flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| work | authors | Tessera | ratio |", "|---|---|---|---|"]
    for r in rows:
        if r["unit"] == "img/s":
            a, t = f"{r['authors']:.2f} img/s", f"{r['tessera']:.2f} img/s"
        else:
            a, t = f"{r['authors_s']:.3f} s", f"{r['tessera_s']:.3f} s"
        work = r["work"] if r.get("same_numerics", True) else f"{r['work']} (other numerics)"
        lines.append(f"| {work} | {a} | {t} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def dq_status(dq_repo: str | None) -> str:
    if dq_repo is None:
        return "not run (no --dq-repo)"
    return ("not comparable: Tessera has no importer for the DynamicVectorQuantization DQ-VAE checkpoint layout "
            "(their EncoderDual / RouterDual module tree), so the same weights cannot be loaded into both sides; "
            "their stage-1 modules also import pytorch_lightning, which is not a Tessera dependency")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--authors-repo", required=True, help="checkout of kakaobrain/rq-vae-transformer")
    p.add_argument("--dq-repo", default=None, help="checkout of CrossmodalGroup/DynamicVectorQuantization")
    p.add_argument("--rows", default="rqvae,prior", help="groups to run: rqvae, prior")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="also time Tessera's precision=bf16 RQ-VAE (other numerics)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per side (1: robust when other jobs share the cores)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    theirs_lib.load(args.authors_repo)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    groups = args.rows.split(",")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if "rqvae" in groups:
            rows += rqvae_rows(args.repeats, Path(tmp), args.bf16)
        if "prior" in groups:
            rows += prior_rows(args.repeats)
    run = {"command": report.command_line("benchmarks/vs_authors.py"), "load_before": load_before,
           "load_after": load_average(), "repeats": args.repeats, "threads": args.threads}
    for r in rows:
        r["run"] = run
    out = Path(args.out)
    # Rows of groups not run this time are kept from the previous file (one group can be re-measured
    # when the machine is quiet without redoing the others).
    kept = json.loads(out.read_text()).get("data", {}).get("rows", []) if out.is_file() else []
    rows = [r for r in kept if r["key"] not in {n["key"] for n in rows}] + rows
    report.write_section(out, section(rows, run, dq_status(args.dq_repo)))
    print(table(rows))
    print(f"DQ tokenizer encode: {dq_status(args.dq_repo)}")
    print(f"load average before {load_before}, after {run['load_after']}; wrote {out}")


def section(rows: list[dict], run: dict, dq: str) -> dict:
    """The BENCHMARKS.md section (benchmarks/README.md: schema); reading and text are kept from the
    file it replaces."""
    cells = []
    for r in rows:
        if r["unit"] == "img/s":
            a, t = f"{r['authors']:.2f} img/s", f"{r['tessera']:.2f} img/s"
        else:
            a, t = f"{r['authors_s']:.3f} s", f"{r['tessera_s']:.3f} s"
        cells.append([r["work"], a, t, f"{r['speedup']:.2f}x", "yes" if r.get("same_numerics", True) else "no"])
    return {"title": "Versus the authors' code", "order": 45,
            "measures": "Tessera against kakaobrain/rq-vae-transformer on the same random weights and inputs "
                        "(theirs built by their code, ours through Tessera's importers), after checking that "
                        "both compute the same thing; median of alternated rounds after a warm-up.",
            "command": run["command"],
            "machine": f"{report.describe_machine('cpu', run['threads'])}; shared with other jobs, load average "
                       f"{run['load_before'][0]} before and {run['load_after'][0]} after",
            "tables": [{"columns": ["work", "authors", "Tessera", "ratio", "same numerics"], "rows": cells}],
            "data": {"rows": rows, "dq": dq}}

if __name__ == "__main__":
    main()
