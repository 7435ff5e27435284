"""`cosmolit simulate`, `merge` and `show` through the typer app: exit codes, messages, files."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("galsim")

from cosmolit.cli import app  # noqa: E402
from cosmolit.dataset import inspect_dataset  # noqa: E402

runner = CliRunner()
SMALL = ["--stamp-size", "32", "--bands", "gri", "--quiet"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    text = result.output if result.stderr_bytes is None else result.stderr
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_simulate_writes_a_dataset(tmp_path):
    out = tmp_path / "a.h5"
    r = run("simulate", "--n", 6, "--out", out, "--seed", 3, "--blend-fraction", 1, "--max-neighbors", 2, *SMALL)
    assert r.exit_code == 0, r.output
    info = inspect_dataset(out)
    assert (info.n, info.bands, info.stamp, info.seed) == (6, "gri", (32, 32), 3)
    assert "fraction: 1.0" in info.config and "max_neighbors: 2" in info.config
    assert {"nb0_dx", "nb1_mag_i"} <= set(info.truth_names) and "nb2_dx" not in info.truth_names


def test_simulate_with_a_preset_and_noiseless(tmp_path):
    out = tmp_path / "b.h5"
    r = run("simulate", "--n", 3, "--out", out, "--config", "configs/simulate/mixed.yaml", "--noiseless", *SMALL)
    assert r.exit_code == 0, r.output
    cfg = inspect_dataset(out).config
    assert "fraction: 0.5" in cfg and "mode: none" in cfg


def test_simulate_no_clean_drops_only_the_clean_stamps(tmp_path):
    import h5py
    import numpy as np

    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    assert run("simulate", "--n", 4, "--out", a, "--seed", 5, *SMALL).exit_code == 0
    r = run("simulate", "--n", 4, "--out", b, "--seed", 5, "--no-clean", *SMALL)
    assert r.exit_code == 0, r.output
    assert inspect_dataset(a).has_clean and not inspect_dataset(b).has_clean
    assert "store_clean: false" in inspect_dataset(b).config
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert np.array_equal(fa["images"][:], fb["images"][:])
        assert all(np.array_equal(fa["truth"][k][:], fb["truth"][k][:], equal_nan=True) for k in fa["truth"])
    # --scene adds the noiseless scenes and changes nothing else
    c = tmp_path / "c.h5"
    assert run("simulate", "--n", 4, "--out", c, "--seed", 5, "--scene", *SMALL).exit_code == 0
    assert inspect_dataset(c).has_scene and not inspect_dataset(a).has_scene
    assert "noiseless scene yes" in run("info", c).output and "noiseless scene no" in run("info", a).output
    with h5py.File(a, "r") as fa, h5py.File(c, "r") as fc:
        assert np.array_equal(fa["images"][:], fc["images"][:]) and np.array_equal(fa["clean"][:], fc["clean"][:])


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be a positive integer"),
    (["--n", "4", "--stamp-size", "40"], "multiple of 16"),
    (["--n", "4", "--bands", "gqr"], "unknown: q"),
    (["--n", "4", "--blend-fraction", "1.5"], "blend fraction"),
    (["--n", "4", "--max-neighbors", "0"], "max neighbors"),
    (["--n", "4", "--shard", "2", "--num-shards", "2"], "shard index"),
    (["--n", "4", "--workers", "0"], "--workers"),
    (["--n", "4", "--config", "nope.yaml"], "does not exist"),
    (["--n", "4", "--scene", "--noiseless"], "store_scene"),
])
def test_simulate_bad_input_is_one_line_exit_2_and_no_file(tmp_path, args, message):
    out = tmp_path / "x.h5"
    r = run("simulate", "--out", out, *args)
    assert r.exit_code == 2
    line = error_line(r)
    assert line.startswith("cosmolit: error:") and message in line
    assert list(tmp_path.iterdir()) == []


def test_simulate_refuses_existing_output_and_missing_folder(tmp_path):
    out = tmp_path / "x.h5"
    out.write_text("precious")
    r = run("simulate", "--n", 2, "--out", out, *SMALL)
    assert r.exit_code == 2 and "--force" in error_line(r)
    assert out.read_text() == "precious"
    r = run("simulate", "--n", 2, "--out", tmp_path / "no" / "x.h5", *SMALL)
    assert r.exit_code == 2 and "does not exist" in error_line(r)
    r = run("simulate", "--n", 2, "--out", out, "--force", *SMALL)
    assert r.exit_code == 0 and inspect_dataset(out).n == 2


def test_simulate_catalog_missing_columns(tmp_path, catsim_sample):
    from astropy.table import Table

    table = Table.read(catsim_sample)
    table.remove_column("pa_bulge")
    bad = tmp_path / "bad.fits"
    table.write(bad)
    r = run("simulate", "--n", 2, "--out", tmp_path / "x.h5", "--catalog", bad, *SMALL)
    assert r.exit_code == 2 and "pa_bulge" in error_line(r)
    assert not (tmp_path / "x.h5").exists()


def test_shards_merge_and_merge_errors(tmp_path):
    shards = []
    for i in range(2):
        s = tmp_path / f"s{i}.h5"
        r = run("simulate", "--n", 10, "--out", s, "--shard", i, "--num-shards", 2, "--seed", 4, *SMALL)
        assert r.exit_code == 0, r.output
        shards.append(s)
    r = run("merge", tmp_path / "m.h5", *shards, "--quiet")
    assert r.exit_code == 0, r.output
    single = tmp_path / "single.h5"
    assert run("simulate", "--n", 10, "--out", single, "--seed", 4, *SMALL).exit_code == 0
    assert (tmp_path / "m.h5").read_bytes() == single.read_bytes()
    r = run("merge", tmp_path / "m2.h5", shards[0], "--quiet")
    assert r.exit_code == 2 and "missing index(es) 1" in error_line(r)
    r = run("merge", tmp_path / "m.h5", *shards, "--quiet")
    assert r.exit_code == 2 and "--force" in error_line(r)
    assert not (tmp_path / "m2.h5").exists()


def test_show_writes_two_pngs(tmp_path, synthetic_small_h5):
    data = tmp_path / "d.h5"
    assert run("simulate", "--n", 5, "--out", data, "--blend-fraction", 0.5, *SMALL).exit_code == 0
    grid = tmp_path / "grid.png"
    r = run("show", data, "--out", grid, "--n", 4)
    assert r.exit_code == 0, r.output
    truth = tmp_path / "grid_truth.png"
    for p in (grid, truth):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    r = run("show", data, "--out", grid)
    assert r.exit_code == 2 and "--force" in error_line(r)
    # any file of the format: the synthetic set has only gri and no neighbour columns
    r = run("show", synthetic_small_h5, "--out", tmp_path / "syn.png", "--n", 3)
    assert r.exit_code == 0, r.output
    r = run("show", tmp_path / "missing.h5", "--out", tmp_path / "z.png")
    assert r.exit_code == 2 and "does not exist" in error_line(r)
    assert not (tmp_path / "z.png").exists()


def _wait_for_partial(folder, pid, deadline=120):
    import time

    end = time.time() + deadline
    while time.time() < end:
        found = [p for p in folder.iterdir() if p.name.startswith(f".x.h5.{pid}.") and p.name.endswith(".partial.h5")]
        if found:
            time.sleep(1.0)  # let it write some blocks
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no temporary file of process {pid} after {deadline} s")


def test_sigterm_removes_the_temporary_file_and_a_killed_runs_leftover(tmp_path):
    """A real `cosmolit simulate`: SIGKILL leaves a .partial; the next run of the same command removes
    it, and SIGTERM to that run (with workers) exits 143 leaving nothing, workers included."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "cosmolit", "simulate", "--n", "5000", "--out", str(tmp_path / "x.h5"),
           "--stamp-size", "32", "--bands", "gri"]
    killed = subprocess.Popen([*cmd, "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stale = _wait_for_partial(tmp_path, killed.pid)
    killed.kill()
    assert killed.wait() == -signal.SIGKILL and stale.exists()

    proc = subprocess.Popen([*cmd, "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_partial(tmp_path, proc.pid)
    assert not stale.exists()  # removed by the next run of the same output
    children, workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children"), []  # Linux: the worker pids
    end = time.time() + 60
    while children.exists() and len(workers) < 2 and time.time() < end:
        workers = [int(p) for p in children.read_text().split()]
        time.sleep(0.05)
    assert len(workers) == 2 or not children.exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert [line for line in err.splitlines() if line.strip()] == [
        f"cosmolit: stopped by SIGTERM; the unfinished {str(tmp_path / 'x.h5')!r} was removed"]
    assert list(tmp_path.iterdir()) == []
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_simulate_refuses_at_once_an_output_larger_than_the_free_space(tmp_path, monkeypatch):
    import re
    import shutil
    import time
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 50 * 10**9))
    t0 = time.perf_counter()
    r = run("simulate", "--n", 10**10, "--out", tmp_path / "x.h5", *SMALL)
    assert time.perf_counter() - t0 < 10
    assert r.exit_code == 2
    line = error_line(r)
    m = re.fullmatch(r"cosmolit: error: output '.*x\.h5' needs about ([\d.]+) TB but only 50\.0 GB are free in '.*'",
                     line)
    assert m, line
    # 1e10 stamps of images + clean, 3 bands of 32 x 32 float32, plus the truth columns
    assert 2 * 3 * 32 * 32 * 4 * 10**10 < float(m.group(1)) * 1e12 < 1.02 * 2 * 3 * 32 * 32 * 4 * 10**10
    assert list(tmp_path.iterdir()) == []
