"""`cosmolit bench plot`: the study's two-panel figures, cosmolit's runs beside the paper's numbers.

Left: time against batch size (train: seconds per 100 epochs of 8,000 images) or against the
number of generated images (generate: seconds), log-log. Right: the ratio of every series to a
baseline series at the x values they share (the study drew GPU time / IPU time); with
`--reference paper` the study's own V100 / GC2 ratio is drawn too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from cosmolit.errors import UsageError

REFERENCES = ("paper", "none")


def _series_from(payload: dict, model: Optional[str]) -> dict[str, dict[int, float]]:
    """{legend: {x: seconds}} from one results document."""
    label = payload["label"]
    out: dict[str, dict[int, float]] = {}
    if payload["kind"] == "train":
        for row in payload["results"]:
            if model is not None and row["model"] != model:
                continue
            key = f"{label} ({row['model']}, {row['mode']})"
            out.setdefault(key, {})[int(row["batch_size"])] = float(row["seconds_per_100_epochs"])
    else:
        for row in payload["results"]:
            key = f"{label} ({row.get('mode', 'eager')})"
            out.setdefault(key, {})[int(row["n"])] = float(row["time"]["median"])
    return out


def collect_series(payloads: Sequence[dict], reference: str = "paper", model: Optional[str] = None):
    """(kind, model, ours {legend: {x: y}}, refs {legend: {x: y}}) for a set of results documents."""
    from cosmolit.bench import reference as ref

    if reference not in REFERENCES:
        raise UsageError(f"--reference {reference!r} is not one of {', '.join(REFERENCES)}")
    kinds = {p["kind"] for p in payloads}
    if len(kinds) != 1 or kinds & {"overhead"}:
        raise UsageError(f"plot needs results of one kind, train or generate; got {', '.join(sorted(kinds))}")
    kind = kinds.pop()
    if kind == "train" and model is None:
        models = [row["model"] for p in payloads for row in p["results"]]
        model = models[0]
    ours: dict[str, dict[int, float]] = {}
    for p in payloads:
        for key, pts in _series_from(p, model).items():
            name, k = key, 2
            while name in ours:  # two files with the same label
                name, k = f"{key} #{k}", k + 1
            ours[name] = pts
    if not ours:
        raise UsageError(f"no results for model {model!r} in the given files")
    refs = {}
    if reference == "paper":
        refs = ref.train_series(model) if kind == "train" else ref.generate_series()
    return kind, model, ours, refs


def ratio(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """a / b at the x values both series have."""
    return {x: a[x] / b[x] for x in sorted(set(a) & set(b)) if b[x] > 0}


def plot_results(paths: Sequence[str | Path], out: str | Path, reference: str = "paper",
                 baseline: Optional[str] = None, model: Optional[str] = None, force: bool = False) -> Path:
    """Draw the two-panel figure of `paths` (results files) into `out` (PNG, PDF or SVG)."""
    from cosmolit.bench.results import load_results
    from cosmolit.dataset import atomic_path, check_output_path

    if not paths:
        raise UsageError("give at least one results file")
    out = check_output_path(out, force=force, what="figure")
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"figure {str(out)!r}: use a .png, .pdf or .svg name")
    payloads = [load_results(p) for p in paths]
    kind, model, ours, refs = collect_series(payloads, reference, model)
    every = {**ours, **refs}
    if baseline is None:
        base_name = next(iter(ours))
    else:
        matches = [k for k in every if baseline.lower() in k.lower()]
        if not matches:
            raise UsageError(f"--baseline {baseline!r} matches no series; series: {'; '.join(every)}")
        base_name = matches[0]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import ScalarFormatter

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {name: cycle[i % len(cycle)] for i, name in enumerate(every)}  # same colour in both panels
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in ours.items():
        xs = sorted(pts)
        left.plot(xs, [pts[x] for x in xs], "o-", color=colour[name], label=name)
    for name, pts in refs.items():
        xs = sorted(pts)
        left.plot(xs, [pts[x] for x in xs], "s--", color=colour[name], alpha=0.8, label=name)
    left.set_xscale("log")
    left.set_yscale("log")
    if kind == "train":
        left.set_xlabel("batch size")
        left.set_ylabel("seconds per 100 epochs of 8,000 images")
        left.set_title(f"training time, {'shape CNN' if model == 'cnn' else 'Bayesian CNN'}")
    else:
        left.set_xlabel("number of generated images")
        left.set_ylabel("seconds (flow sampling + decoding)")
        left.set_title("VAE generation time")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)

    base = every[base_name]
    drawn = 0
    for name, pts in every.items():
        if name == base_name:
            continue
        r = ratio(pts, base)
        if r:
            xs = sorted(r)
            right.plot(xs, [r[x] for x in xs], "o-" if name in ours else "s--", color=colour[name],
                       label=f"{name} / baseline")
            drawn += 1
    gpu, ipu = "V100 GPU (paper)", "GC2 IPU (paper)"
    if gpu in refs and ipu in refs and base_name not in (gpu, ipu):
        r = ratio(refs[gpu], refs[ipu])
        xs = sorted(r)
        right.plot(xs, [r[x] for x in xs], "k:", label="paper: V100 / GC2 IPU")
        drawn += 1
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel(left.get_xlabel())
    ticks = sorted({x for pts in every.values() for x in pts})
    for ax in (left, right):
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        if kind == "train" and len(ticks) <= 16:
            ax.set_xticks([t for t in ticks if t in (2, 4, 8, 14, 32, 128) or len(ticks) <= 8])
    right.set_ylabel("time ratio")
    right.set_title(f"ratio to baseline: {base_name}", fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    if drawn:
        right.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out, out.suffix) as tmp:
        fig.savefig(tmp, dpi=120, format=out.suffix.lstrip("."))
    plt.close(fig)
    return out
