"""Running the simulator: in memory (draw_stamps), to a file with workers and shards, and merging shards.

Stamp `i` of a run always comes from SeedSequence(seed) child `i`, and stamps are written in
fixed global blocks of UNIT stamps, in order; so the bytes of a file depend only on (config, n,
seed), never on the number of workers, and merged shards equal a single run. Blocks (and their
seeds) are made one at a time as the run goes, so memory does not grow with n.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cosmolit.dataset import DatasetWriter, check_free_space, check_output_path, inspect_dataset
from cosmolit.errors import UsageError
from cosmolit.sim.config import SimulationConfig, config_from_yaml_text

UNIT = 16  # stamps per work unit and per write; fixed so that files never depend on workers

_DRAWERS: dict = {}  # per-process cache: config YAML -> StampDrawer


def _drawer(config_yaml: str, psf: bool = True):
    key = (config_yaml, psf)
    if key not in _DRAWERS:
        from cosmolit.sim.draw import StampDrawer

        _DRAWERS.clear()
        _DRAWERS[key] = StampDrawer(config_from_yaml_text(config_yaml), psf=psf)
    return _DRAWERS[key]


def _draw_range(args: tuple) -> tuple[int, np.ndarray, np.ndarray, dict]:
    """Worker job: stamps [start, stop) -> (start, images, clean, scene, truth columns), stamps (b, B, H, W)."""
    config_yaml, seed, start, stop, psf = args
    d = _drawer(config_yaml, psf)
    images, cleans, scenes, rows = [], [], [], []
    for index in range(start, stop):
        image, clean, scene, truth = d.draw(seed, index)
        images.append(image)
        cleans.append(clean)
        scenes.append(scene)
        rows.append(truth)
    truth = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return start, np.stack(images), np.stack(cleans), np.stack(scenes), truth


def _check_run(n: int, seed: int, workers: int) -> None:
    for name, value in (("n", n), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")


def draw_stamps(config: SimulationConfig, n: int, seed: int, start: int = 0, psf: bool = True):
    """Stamps start .. start+n-1 in memory: (images (n, B, H, W) float32, clean (n, B, H, W), truth dict).

    `psf=False` (for tests) draws the galaxies without PSF. Same values as simulate_to_file.
    """
    _check_run(n, seed, 1)
    _, images, clean, _, truth = _draw_range((config.to_yaml(), seed, start, start + n, psf))
    return images, clean, truth


def shard_range(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Global stamp range [lo, hi) of shard `shard` of `num_shards`."""
    return shard * n // num_shards, (shard + 1) * n // num_shards


def _count_units(lo: int, hi: int) -> int:
    """Number of global UNIT-aligned blocks that meet [lo, hi)."""
    return -(-hi // UNIT) - lo // UNIT if hi > lo else 0


def _unit(lo: int, hi: int, j: int) -> tuple[int, int]:
    """Block `j` of [lo, hi): a global UNIT-aligned block intersected with [lo, hi)."""
    base = lo // UNIT + j
    return max(lo, base * UNIT), min(hi, (base + 1) * UNIT)


def _units(lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The blocks of [lo, hi) in order, one at a time."""
    return (_unit(lo, hi, j) for j in range(_count_units(lo, hi)))


def _worker(conn, config_yaml: str, seed: int, lo: int, hi: int, psf: bool, k: int, workers: int) -> None:
    """Worker k of `workers`: draws blocks k, k + workers, ... of [lo, hi) and sends them, in order, on conn."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # whatever handler the parent had when it forked
    try:
        for j in range(k, _count_units(lo, hi), workers):
            conn.send(_draw_range((config_yaml, seed, *_unit(lo, hi, j), psf)))  # blocks while the parent lags
    except Exception as exc:  # handed to the parent, which raises it
        with contextlib.suppress(OSError):  # the parent is gone
            conn.send(exc)
    finally:
        conn.close()


def _run_units(config_yaml: str, seed: int, lo: int, hi: int, workers: int, psf: bool = True) -> Iterator[tuple]:
    """Results of _draw_range over the blocks of [lo, hi), in order; `workers` processes when > 1.

    Each worker has its own pipe and no lock is shared, so a worker killed from outside (a
    scheduler's SIGTERM reaches every process) cannot hang the parent; at most one block per
    worker waits in a pipe, so memory stays bounded whatever the number of stamps.
    """
    count = _count_units(lo, hi)
    workers = min(workers, count)
    if workers <= 1:
        for a, b in _units(lo, hi):
            yield _draw_range((config_yaml, seed, a, b, psf))
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = mp.get_context(method)
    if method == "fork":
        _drawer(config_yaml, psf)  # built once here, inherited by every forked worker
    procs, conns = [], []
    try:
        for k in range(workers):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(send, config_yaml, seed, lo, hi, psf, k, workers), daemon=True)
            proc.start()
            send.close()  # the worker now holds the only write end: its death reads as EOF here
            procs.append(proc)
            conns.append(recv)
        for j in range(count):
            try:
                result = conns[j % workers].recv()
            except (EOFError, OSError):  # killed from outside, or by the OOM killer
                proc = procs[j % workers]
                proc.join()
                raise RuntimeError(f"simulation worker {j % workers} died (exit code {proc.exitcode})") from None
            if isinstance(result, BaseException):
                raise result
            yield result
    except BaseException:
        for proc in procs:  # Ctrl-C, SIGTERM or an error: stop the workers now, the writer drops its temp file
            proc.terminate()
        raise
    finally:
        for proc in procs:
            proc.join()
        for conn in conns:
            conn.close()


def _file_attrs(config: SimulationConfig, seed: int, n_total: int, shard: int, num_shards: int, lo: int) -> dict:
    from cosmolit.sim.survey import band_surveys

    surveys = band_surveys(config)
    return {
        "pixel_scale": float(config.pixel_scale),
        "psf_fwhm": np.array([b.psf_fwhm for b in surveys]),
        "sky_level": np.array([b.sky_level for b in surveys]),
        "seed": int(seed),
        "config": config.to_yaml(),
        "generator": "cosmolit.sim",
        "n_total": int(n_total),
        "shard_index": int(shard),
        "num_shards": int(num_shards),
        "shard_start": int(lo),
    }


def simulate_to_file(
    config: SimulationConfig,
    out: str | Path,
    n: int,
    seed: int,
    workers: int = 1,
    shard: int | None = None,
    num_shards: int = 1,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Simulate `n` stamps (or shard `shard` of `num_shards` of them) into the dataset file `out`.

    Raises UsageError (nothing written) for bad arguments, an existing `out` without force, an
    unwritable folder, an output larger than the free space there or an unusable catalog.
    Returns the path written.
    """
    from cosmolit.progress import progress_bar
    from cosmolit.sim.draw import truth_columns

    _check_run(n, seed, workers)
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise UsageError(f"num_shards must be a positive integer, got {num_shards!r}")
    if shard is None:
        if num_shards != 1:
            raise UsageError(f"--num-shards {num_shards} needs --shard i with 0 <= i < {num_shards}")
        shard = 0
    if not 0 <= shard < num_shards:
        raise UsageError(f"shard index must satisfy 0 <= shard < num_shards={num_shards}, got {shard}")
    if num_shards > n:
        raise UsageError(f"num_shards ({num_shards}) cannot exceed n ({n})")
    out = check_output_path(out, force)
    lo, hi = shard_range(n, shard, num_shards)
    names, dtypes = truth_columns(config)
    size = config.stamp_size
    writer = DatasetWriter(out, hi - lo, config.bands, size, size, names,
                           attrs=_file_attrs(config, seed, n, shard, num_shards, lo),
                           clean=config.store_clean, scene=config.store_scene, truth_dtypes=dtypes)
    check_free_space(out, writer.nbytes)  # a typo in n fails here, at once
    if config.catalog is not None:  # fail early, before any work, on a bad catalog
        from cosmolit.sim.catalog import load_catalog

        load_catalog(config.catalog, config.population.mag_i_max)
    with writer, progress_bar(hi - lo, "simulating", enabled=progress) as advance:
        for start, images, clean, scene, truth in _run_units(config.to_yaml(), seed, lo, hi, workers):
            writer.write(start - lo, images, truth, clean if config.store_clean else None,
                         scene=scene if config.store_scene else None)
            advance(len(images))
    return out


def merge_files(out: str | Path, shards: Sequence[str | Path], force: bool = False, progress: bool = True) -> Path:
    """Merge the complete set of shards of one run into `out`, byte-identical to a single run."""
    import h5py

    from cosmolit.progress import progress_bar

    if not shards:
        raise UsageError("merge needs at least one shard file")
    out = check_output_path(out, force)
    if any(Path(s).resolve() == out.resolve() for s in shards):
        raise UsageError(f"output {str(out)!r} is also one of the shards")
    metas = []
    for s in shards:
        info = inspect_dataset(s, require_truth=())
        a = info.attrs
        if "num_shards" not in a or "shard_index" not in a:
            raise UsageError(f"{str(s)!r} is not a shard made by `cosmolit simulate` (no shard attributes)")
        metas.append((int(a["shard_index"]), Path(s), info))
    first = metas[0][2]
    num = int(first.attrs["num_shards"])
    n_total = int(first.attrs["n_total"])
    for idx, path, info in metas:
        a = info.attrs
        same = (info.config == first.config and info.seed == first.seed and info.bands == first.bands
                and info.stamp == first.stamp and int(a["num_shards"]) == num and int(a["n_total"]) == n_total
                and info.truth_names == first.truth_names and info.has_clean == first.has_clean
                and info.has_scene == first.has_scene)
        if not same:
            raise UsageError(
                f"shard {str(path)!r} is not from the same run as {str(metas[0][1])!r} "
                "(config, seed, bands, stamp size, n or num_shards differ)"
            )
        lo, hi = shard_range(n_total, idx, num)
        if info.n != hi - lo or int(a.get("shard_start", -1)) != lo:
            raise UsageError(f"shard {str(path)!r} holds {info.n} stamps, expected {hi - lo} for shard {idx}")
    indices = sorted(m[0] for m in metas)
    if indices != list(range(num)):
        missing = sorted(set(range(num)) - set(indices))
        dup = sorted({i for i in indices if indices.count(i) > 1})
        raise UsageError(
            f"shards are incomplete: run has {num} shards; "
            + (f"missing index(es) {', '.join(map(str, missing))}" if missing else "")
            + ("; " if missing and dup else "")
            + (f"duplicated index(es) {', '.join(map(str, dup))}" if dup else "")
        )
    by_index = {m[0]: m[1] for m in metas}
    config = config_from_yaml_text(first.config)
    names = first.truth_names
    with h5py.File(by_index[0], "r") as f0:
        dtypes = {k: f0["truth"][k].dtype.str for k in names}
    handles = {i: h5py.File(p, "r") for i, p in by_index.items()}
    try:
        with DatasetWriter(out, n_total, first.bands, first.height, first.width, names,
                           attrs=_file_attrs(config, first.seed, n_total, 0, 1, 0),
                           clean=first.has_clean, scene=first.has_scene, truth_dtypes=dtypes) as writer, \
                progress_bar(n_total, "merging", enabled=progress) as advance:
            for i in range(num):
                lo, hi = shard_range(n_total, i, num)
                f = handles[i]
                for a, b in _units(lo, hi):  # the same global blocks as a single run writes
                    sl = slice(a - lo, b - lo)
                    writer.write(a, f["images"][sl], {k: f["truth"][k][sl] for k in names},
                                 f["clean"][sl] if first.has_clean else None,
                                 scene=f["scene"][sl] if first.has_scene else None)
                    advance(b - a)
    finally:
        for f in handles.values():
            f.close()
    return out
