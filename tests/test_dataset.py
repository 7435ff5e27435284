import hashlib

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
