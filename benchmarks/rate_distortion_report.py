"""The rate-distortion benchmark's output: the PSNR / random-feature FD plot, the markdown table
and the BENCHMARKS.md section of one results folder (benchmarks/rate_distortion.py writes the
raw results; `--replot` redraws from them through this module).
"""
from __future__ import annotations

from pathlib import Path

from report import markdown_table, write_section

REPO = Path(__file__).resolve().parents[1]


def plot(variants: list[dict], reference: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    fig, (ax, ax_fd) = plt.subplots(1, 2, figsize=(11, 4.4))
    colours = {"vq": "tab:blue", "rq": "tab:orange", "dq": "tab:green"}
    xs = sorted({round(v["codes_per_image"], 1) for v in variants})
    for axis, key in ((ax, "psnr"), (ax_fd, "fd_random_features")):
        for v in variants:
            axis.scatter(v["codes_per_image"], v[key], color=colours[v["kind"]], s=40, zorder=3)
            axis.annotate(v["label"], (v["codes_per_image"], v[key]), textcoords="offset points", xytext=(5, 5),
                          fontsize=8, color=colours[v["kind"]])
        rq = sorted((v for v in variants if v["kind"] == "rq"), key=lambda v: v["depth"])
        if len(rq) > 1:
            axis.plot([v["codes_per_image"] for v in rq], [v[key] for v in rq], color=colours["rq"], zorder=2,
                      label="RQ, depth 2 -> 4")
        vq1 = [v for v in variants if v["name"] == "vq-coarse"]
        if rq and vq1:  # VQ on the coarse grid is RQ with depth 1
            axis.plot([vq1[0]["codes_per_image"], rq[0]["codes_per_image"]], [vq1[0][key], rq[0][key]], ":",
                      color=colours["rq"], lw=1, zorder=2, label="depth 1 (= VQ coarse) -> 2")
        base_key = "psnr_baseline_downsample" if key == "psnr" else "fd_baseline_downsample"
        pts = sorted((v["codes_per_image"], v[base_key]) for v in variants)
        axis.plot([p[0] for p in pts], [p[1] for p in pts], "x:", color="grey", zorder=1,
                  label="blurred downsample, same bits")
        axis.axhline(reference["psnr_mean_colour" if key == "psnr" else "fd_mean_colour"], color="grey", lw=0.8,
                     ls="--", label="mean colour (24 bits)")
        axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [f"{x:g}" for x in xs])
        axis.xaxis.set_minor_formatter(NullFormatter())
        if xs:
            axis.set_xlim(xs[0] / 1.25, xs[-1] * 1.6)
        axis.set_xlabel("codes per image (mean; 8 bits each)")
        axis.grid(alpha=0.3)
    vq = sorted((v for v in variants if v["kind"] == "vq"), key=lambda v: v["codes_per_image"])
    if len(vq) == 2:
        ax.plot([v["codes_per_image"] for v in vq], [v["psnr"] for v in vq], "--", color=colours["vq"], lw=0.8,
                zorder=1, label="VQ 4x4 / 8x8 time-sharing")
    ax_fd.axhline(reference["fd_train_vs_val_originals"], color="black", lw=0.8, ls="-.",
                  label="floor: train vs val originals")
    ax.set_ylabel("PSNR (dB, val; higher is better)")
    ax.set_title("PSNR vs code length", fontsize=10)
    ax_fd.set_yscale("log")
    lo, hi = ax_fd.get_ylim()
    ax_fd.set_yticks([t for t in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 50, 100) if lo <= t <= hi])
    ax_fd.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax_fd.yaxis.set_minor_formatter(NullFormatter())
    ax_fd.set_ylabel("random-feature Frechet distance (lower is better)")
    ax_fd.set_title("random-feature FD vs code length (untrained conv net; not FID)", fontsize=10)
    for axis in (ax, ax_fd):
        axis.legend(fontsize=7, loc="best", framealpha=0.9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_title(result: dict) -> str:
    b = result["budget"]
    k = result["variants"][0]["codebook_size"] if result["variants"] else "?"
    return (f"Tokenizers on the embedded dataset, {b['resolution']} px, equal budget: {b['steps']} steps x batch "
            f"{b['batch_size']}, lr {b['lr']:g}, K={k}, {b['num_val']} val images")


def _percent(record: dict, key: str) -> str:
    """A class accuracy in %, or '-' in results saved before the classifier column existed."""
    return f"{100 * record[key]:.1f}" if key in record else "-"


def table(variants: list[dict], reference: dict) -> tuple[list[str], list[list]]:
    """(columns, rows) of the results table: one row per variant, then the two references."""
    columns = ["variant", "grid / depth", "params", "codes/image", "bits/image", "PSNR val (dB)", "class acc %",
               "usage % per depth", "random-feature FD", "downsample baseline: side, PSNR, class acc %, FD",
               "train s"]
    rows = []
    for v in variants:
        usage = " / ".join(f"{u:.0f}" for u in v["usage_per_depth"])
        codes = f"{v['codes_per_image']:.1f}"
        if v["kind"] == "dq":
            lo, hi = v["codes_per_image_min_max"]
            codes += f" ({lo:.0f}-{hi:.0f})"
        bits = f"{v['bits_per_image']:.0f}" + (f" (+{v['side_info_bits']:.0f} map)" if v["side_info_bits"] else "")
        grid = f"{v['grid']}x{v['grid']}" + (f"/{2 * v['grid']}x{2 * v['grid']}" if v["kind"] == "dq" else "")
        rows.append([v["label"], f"{grid}, D={v['depth']}", f"{v['parameters'] / 1e6:.2f}M", codes, bits,
                     f"{v['psnr']:.2f}", _percent(v, "class_acc"), usage, f"{v['fd_random_features']:.4g}",
                     f"{v['downsample_side']}x{v['downsample_side']}, {v['psnr_baseline_downsample']:.2f}, "
                     f"{_percent(v, 'class_acc_baseline_downsample')}, {v['fd_baseline_downsample']:.4g}",
                     f"{v['train_wall_time_s']:.0f}"])
    rows.append(["mean colour (baseline)", "-", "-", "-", "24", f"{reference['psnr_mean_colour']:.2f}",
                 _percent(reference, "class_acc_mean_colour"), "-", f"{reference['fd_mean_colour']:.4g}", "-", "-"])
    rows.append(["val originals", "-", "-", "-", "-", "-", _percent(reference, "class_acc_originals"), "-",
                 f"{reference['fd_train_vs_val_originals']:.4g} (train vs val: FD floor)", "-", "-"])
    return columns, rows


def section(result: dict, results_dir: Path) -> dict:
    """The BENCHMARKS.md section of one results folder (its raw JSON stays beside the PNG)."""
    b, m = result["budget"], result["machine"]
    columns, rows = table(result["variants"], result["reference"])
    png = (results_dir / "rate_distortion.png").resolve()
    return {
        "title": f"Rate-distortion of the tokenizers: {results_dir.name}",
        "order": 30,
        "measures": f"VQ, RQ and DQ tokenizers trained by the real pipeline (shard once, train_tokenizer per "
                    f"variant) with one budget: {b['steps']} steps x batch {b['batch_size']}, lr {b['lr']:g}, seed "
                    f"{b['seed']}, {b['resolution']} px `{b.get('synthetic_style', 'textures')}` images, "
                    f"{b['num_train']} train / {b['num_val']} val, K = 256, l2 loss, the demo network. Per variant: "
                    "val PSNR, the probe classifier's accuracy on the reconstructions, codebook usage, a "
                    "random-feature Frechet distance (a fixed untrained conv net: comparable within this table "
                    "only, not an FID), and the same-bits blurred downsample and mean-colour baselines.",
        "command": result["command"],
        "machine": f"{m['cpu_count']} CPU cores, {m['platform']}, torch {m['torch']}, {m['torch_threads']} torch "
                   f"thread(s), variants one after another ({result.get('total_wall_time_s', '?')} s in all)",
        "date": result.get("date", ""),
        "tables": [{"columns": columns, "rows": rows}],
        "images": [{"path": str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png),
                    "alt": "PSNR and random-feature FD vs codes per image"}],
        "data": {"raw": str((results_dir / "rate_distortion.json").resolve().relative_to(REPO))
                 if results_dir.resolve().is_relative_to(REPO) else str(results_dir / "rate_distortion.json")},
    }


def publish(result: dict, results_dir: Path, section_path: Path) -> None:
    plot(result["variants"], result["reference"], results_dir / "rate_distortion.png", plot_title(result))
    print(markdown_table(*table(result["variants"], result["reference"])))
    write_section(section_path, section(result, results_dir))
