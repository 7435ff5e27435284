"""Simulation speed: ms per stamp per band for cosmolit's simulator vs a bare GalSim loop (the floor).

For isolated and blended sets, times `simulate_to_file` (HDF5 output included) with 1 and 2 workers,
and a plain loop that draws the same scenes (bulge + disk [+ neighbours] convolved with the band's
PSF, Poisson noise) without truth, clean images or file output. Median of --repeats runs.

    python benchmarks/bench_simulate.py --n 64 --repeats 3 --out benchmarks/results/simulate.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def bare_loop(config, n: int, seed: int) -> float:
    """Seconds to draw the same n scenes with plain GalSim calls (one draw per band, noise)."""
    import galsim

    from cosmolit.sim.draw import StampDrawer, stamp_seeds

    d = StampDrawer(config)
    scenes = []
    for i in range(n):  # sampling is not timed: the floor is the drawing alone
        np_seq, gs_seed = stamp_seeds(seed, i)
        scenes.append((d._sample_scene(np.random.default_rng(np_seq)), gs_seed))
    t0 = time.perf_counter()
    for (target, neighbours), gs_seed in scenes:
        rng = galsim.BaseDeviate(gs_seed)
        for b, band in enumerate(d.bands):
            profs = [d._profile(target, b)] + [d._profile(g, b, dx, dy) for g, dx, dy in neighbours]
            gal = galsim.Add([p for p in profs if p is not None])
            img = galsim.Convolve(gal, d.psfs[b]).drawImage(nx=config.stamp_size, ny=config.stamp_size,
                                                           scale=config.pixel_scale)
            img.addNoise(galsim.PoissonNoise(rng, sky_level=band.sky_level))
    return time.perf_counter() - t0


def timed_simulation(config, n: int, seed: int, workers: int) -> float:
    from cosmolit.sim import simulate_to_file
    from cosmolit.sim.simulate import _drawer

    _drawer(config.to_yaml())  # per-process setup (flux table, PSFs) outside the timing, as for the floor
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        simulate_to_file(config, Path(tmp) / "b.h5", n=n, seed=seed, workers=workers, progress=False)
        return time.perf_counter() - t0


def main() -> None:
    from cosmolit.sim import load_simulation_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="stamps per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/simulate.json"))
    args = ap.parse_args()
    results = {"n": args.n, "repeats": args.repeats, "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "python": platform.python_version(), "sets": {}}
    for name, fraction in (("isolated", 0.0), ("blended", 1.0)):
        cfg = load_simulation_config(None, {"blend.fraction": fraction})
        per = args.n * len(cfg.bands) / 1e3  # -> ms per stamp per band
        row = {}
        row["bare_galsim_ms"] = statistics.median(bare_loop(cfg, args.n, s) for s in range(args.repeats)) / per
        for w in (1, 2):
            row[f"cosmolit_{w}w_ms"] = statistics.median(
                timed_simulation(cfg, args.n, s, w) for s in range(args.repeats)) / per
        row["overhead_vs_bare_1w"] = row["cosmolit_1w_ms"] / row["bare_galsim_ms"]
        row["speedup_2w_vs_1w"] = row["cosmolit_1w_ms"] / row["cosmolit_2w_ms"]
        results["sets"][name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
