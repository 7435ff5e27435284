"""`cosmolit show`: a grid of RGB stamps (Lupton asinh stretch) and histograms of the truth columns.

Works on any file of the dataset format: g, r, i as blue, green, red when present, otherwise
the three reddest bands in file order, or grey with one or two bands.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cosmolit.dataset import atomic_path, check_output_path, inspect_dataset, read_truth
from cosmolit.errors import UsageError


def pick_rgb(bands: str) -> list[int]:
    """Channel indices for (red, green, blue), or one index for grey."""
    if all(b in bands for b in "gri"):
        return [bands.index("i"), bands.index("r"), bands.index("g")]
    if len(bands) >= 3:
        return [len(bands) - 1, len(bands) - 2, len(bands) - 3]
    return [0]


def lupton_rgb(stamp: np.ndarray, channels: list[int], q: float = 8.0) -> np.ndarray:
    """(H, W, 3) in [0, 1] from stamp (B, H, W): asinh stretch of the mean intensity (Lupton et al. 2004)."""
    rgb = np.stack([stamp[c] for c in channels], axis=-1).astype(np.float64)  # (H, W, 3 or 1)
    rgb = np.clip(rgb, 0, None)
    intensity = rgb.mean(-1)
    stretch = max(np.percentile(intensity, 99.5), 1e-12)  # per-stamp scale
    f = np.arcsinh(q * intensity / stretch) / q
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(intensity[..., None] > 0, rgb * (f / intensity)[..., None], 0.0)
    scaled /= max(scaled.max(), 1e-12)
    if scaled.shape[-1] == 1:
        scaled = np.repeat(scaled, 3, axis=-1)
    return np.clip(scaled, 0, 1)


def truth_figure_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_truth{out.suffix or '.png'}")


def show_dataset(path: str | Path, out: str | Path, n: int = 16, force: bool = False) -> tuple[Path, Path]:
    """Write the stamp grid to `out` and truth histograms beside it (`<stem>_truth.png`)."""
    import h5py
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UsageError(f"--n must be a positive integer, got {n!r}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"output {str(out)!r} must end in .png")
    info = inspect_dataset(path, require_truth=())
    check_output_path(out, force)
    out_truth = check_output_path(truth_figure_path(out), force)
    k = min(n, info.n)
    with h5py.File(path, "r") as f:
        stamps = np.asarray(f["images"][:k], dtype=np.float64)  # (k, B, H, W)
    truth = read_truth(path)
    channels = pick_rgb(info.bands)
    mag_key = next((m for m in ("mag_i", "mag_r", *[f"mag_{b}" for b in info.bands]) if m in truth), None)

    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for j, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if j >= k:
            continue
        ax.imshow(lupton_rgb(stamps[j], channels), origin="lower", interpolation="nearest")
        lines = []
        if "e1" in truth and "e2" in truth:
            lines.append(f"e=({truth['e1'][j]:+.2f},{truth['e2'][j]:+.2f})")
        if mag_key:
            lines.append(f"{mag_key[4:]}={truth[mag_key][j]:.1f}")
        if "n_neighbors" in truth:
            lines.append(f"nb={int(truth['n_neighbors'][j])}")
        ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=7,
                color="white", family="monospace")
    label = "".join(info.bands[c] for c in channels)
    fig.suptitle(f"{Path(path).name}: first {k} stamps ({'RGB=' + label if len(channels) == 3 else 'grey ' + label})",
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(out, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

    names = [m for m in truth if not m.startswith("nb") and np.isfinite(truth[m]).any()]
    cols = 4
    rows = max(1, int(np.ceil(len(names) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        v = np.asarray(truth[name], dtype=np.float64)
        v = v[np.isfinite(v)]
        ax.hist(v, bins=30, color="tab:blue")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_axis_off()
    fig.suptitle(f"{Path(path).name}: truth of {info.n} stamps", fontsize=9)
    fig.tight_layout()
    with atomic_path(out_truth, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out, out_truth
