import hashlib
import os

import h5py
import numpy as np
import pytest

from cosmolit.dataset import DatasetWriter, check_output_path, inspect_dataset, iter_images, read_truth
from cosmolit.errors import UsageError
from cosmolit.synthetic import write_synthetic_dataset


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_synthetic_file_follows_the_format(tmp_path):
    p = write_synthetic_dataset(tmp_path / "s.h5", n=12, bands="gri", size=32, seed=1)
    info = inspect_dataset(p)
    assert (info.n, info.bands, info.height, info.width) == (12, "gri", 32, 32)
    assert info.has_clean and {"e1", "e2", "redshift"} <= set(info.truth_names)
    assert len(info.psf_fwhm) == 3 and info.seed == 1
    t = read_truth(p, ["e1", "e2"])
    assert np.all(np.hypot(t["e1"], t["e2"]) < 1)


def test_same_seed_same_bytes(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a.h5", n=8, size=32, seed=4)
    b = write_synthetic_dataset(tmp_path / "b.h5", n=8, size=32, seed=4)
    c = write_synthetic_dataset(tmp_path / "c.h5", n=8, size=32, seed=5)
    assert _digest(a) == _digest(b) != _digest(c)


def test_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "x.h5"
    with pytest.raises(RuntimeError):
        with DatasetWriter(out, 4, "ri", 16, 16, ["e1", "e2", "redshift"]) as w:
            w.write(0, np.zeros((2, 2, 16, 16)), {"e1": [0, 0], "e2": [0, 0], "redshift": [1, 1]})
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_incomplete_writer_is_refused(tmp_path):
    out = tmp_path / "x.h5"
    with pytest.raises(RuntimeError, match="wrote 2 of 4"):
        with DatasetWriter(out, 4, "ri", 16, 16, ["e1", "e2", "redshift"]) as w:
            w.write(0, np.zeros((2, 2, 16, 16)), {"e1": [0, 0], "e2": [0, 0], "redshift": [1, 1]})
    assert not out.exists()


def test_force_keeps_old_file_until_new_one_is_complete(tmp_path):
    out = write_synthetic_dataset(tmp_path / "s.h5", n=4, size=16, seed=1)
    before = _digest(out)
    with pytest.raises(KeyboardInterrupt):
        with DatasetWriter(out, 4, "ri", 16, 16, ["e1", "e2", "redshift"]):
            raise KeyboardInterrupt
    assert _digest(out) == before


def _make(path, **kw):
    with h5py.File(path, "w") as f:
        for k, v in kw.items():
            if k == "attrs":
                f.attrs.update(v)
            else:
                f[k] = v


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda p: p.write_text("not hdf5"), "not an HDF5 file"),
        (lambda p: _make(p, other=np.zeros(3)), "no 'images'"),
        (lambda p: _make(p, images=np.zeros((2, 16, 16), "f4"), attrs={"bands": "r"}), "rank 3"),
        (lambda p: _make(p, images=np.zeros((2, 1, 4, 4), "i4"), attrs={"bands": "r"}), "dtype int32"),
        (lambda p: _make(p, images=np.zeros((0, 1, 4, 4), "f4"), attrs={"bands": "r"}), "empty"),
        (lambda p: _make(p, images=np.zeros((2, 2, 4, 4), "f4"), attrs={"bands": "r"}), "names 1 bands"),
        (lambda p: _make(p, images=np.zeros((2, 1, 4, 4), "f4")), "no 'bands'"),
        (lambda p: _make(p, images=np.zeros((2, 1, 4, 4), "f4"), attrs={"bands": "r"}), "lacks truth column"),
        (lambda p: _make(p, **{"images": np.zeros((2, 1, 4, 4), "f4"), "truth/e1": np.zeros(3),
                               "attrs": {"bands": "r"}}), "length 2"),
    ],
)
def test_bad_files(tmp_path, setup, fragment):
    p = tmp_path / "bad.h5"
    setup(p)
    with pytest.raises(UsageError) as exc:
        inspect_dataset(p)
    assert fragment in str(exc.value)


def test_missing_and_folder(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        inspect_dataset(tmp_path / "none.h5")
    with pytest.raises(UsageError, match="is a folder"):
        inspect_dataset(tmp_path)


def test_nan_pixels_are_reported(tmp_path):
    p = write_synthetic_dataset(tmp_path / "s.h5", n=6, size=16, seed=1)
    with h5py.File(p, "r+") as f:
        f["images"][4, 0, 3, 3] = np.nan
    with pytest.raises(UsageError, match="first in stamp 4"):
        list(iter_images(p, 2))


def test_check_output_path(tmp_path):
    existing = tmp_path / "e.h5"
    existing.write_text("x")
    with pytest.raises(UsageError, match="--force"):
        check_output_path(existing)
    assert check_output_path(existing, force=True) == existing
    with pytest.raises(UsageError, match="does not exist"):
        check_output_path(tmp_path / "no" / "x.h5")


def test_written_file_has_normal_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        p = write_synthetic_dataset(tmp_path / "p.h5", n=2, size=16)
    finally:
        os.umask(umask)
    assert (os.stat(p).st_mode & 0o777) == 0o644



def _dead_pid() -> int:
    """The pid of a process that has run and been reaped."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(path, n=4):
    with DatasetWriter(path, n, "gri", 8, 8, ["e1", "e2", "redshift"]) as w:
        w.write(0, np.zeros((n, 3, 8, 8)), {k: np.zeros(n) for k in ("e1", "e2", "redshift")})


def test_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".x.h5.{dead}.k2j4_xq9.partial.h5"  # what a SIGKILLed writer of x.h5 leaves
    live = tmp_path / f".x.h5.{os.getpid()}.abcd1234.partial.h5"  # a running writer's (this process)
    other = tmp_path / f".x.h5.5.{dead}.abcd1234.partial.h5"  # a dead writer of another output, x.h5.5
    for p in (stale, live, other):
        p.write_bytes(b"half")
    _write(tmp_path / "x.h5")
    assert not stale.exists() and live.exists() and other.exists()
    assert inspect_dataset(tmp_path / "x.h5").n == 4


def test_sigterm_during_a_write_removes_the_temporary_file_and_exits_143(tmp_path):
    import signal
    import time

    from cosmolit.dataset import Terminated, atomic_path

    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(Terminated) as info:
        with atomic_path(tmp_path / "x.json", ".json") as tmp:
            tmp.write_text("{")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
    assert info.value.code == 143
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored: SIGTERM kills again after the write
    # a handler already set (e.g. `cosmolit fit`'s, which saves a checkpoint first) is left to do its job
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with atomic_path(tmp_path / "y.json", ".json") as tmp:
            tmp.write_text("{}")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM] and (tmp_path / "y.json").read_text() == "{}"


def test_writer_refuses_an_output_larger_than_the_free_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    _write(tmp_path / "real.h5", n=40)
    w = DatasetWriter(tmp_path / "real.h5", 40, "gri", 8, 8, ["e1", "e2", "redshift"])
    size = (tmp_path / "real.h5").stat().st_size
    assert size <= w.nbytes <= size + 2**17  # the estimate is the file's size, and never below it
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 1500))
    with pytest.raises(UsageError, match=r"'.*big\.h5' needs about 3\.1 GB but only 1\.5 kB are free in"):
        DatasetWriter(tmp_path / "big.h5", 10**6, "gri", 16, 16, ["e1"]).__enter__()  # 1e6 * (3 * 16 * 16 * 4 + 8) B
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real.h5"]
