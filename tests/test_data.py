"""GalaxyDataModule: batches, seeded split, streaming vs in-memory, workers, normalisation, errors."""

import h5py
import numpy as np
import pytest
import torch

from cosmolit.data import GalaxyDataModule, band_scale
from cosmolit.dataset import read_truth
from cosmolit.errors import UsageError


def _file_arrays(path):
    with h5py.File(path, "r") as f:
        return f["images"][()], (f["clean"][()] if "clean" in f else None)


def test_batches_hold_the_file_stamps_and_truth_in_target_order(synthetic_small_h5):
    dm = GalaxyDataModule(synthetic_small_h5, targets=("redshift", "e1"), batch_size=5, val_fraction=0.25, seed=1)
    dm.setup("fit")
    images, _ = _file_arrays(synthetic_small_h5)
    truth = read_truth(synthetic_small_h5, ["redshift", "e1"])
    # the validation loader keeps file order and every stamp
    xs, ys = zip(*dm.val_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == torch.float32 and y.dtype == torch.float32 and x.shape == (12, 3, 32, 32) and y.shape == (12, 2)
    assert np.array_equal(x.numpy(), images[dm.val_index])
    assert np.allclose(y.numpy(), np.stack([truth["redshift"], truth["e1"]], 1)[dm.val_index])
    # the training loader: full batches only, every stamp of the training split at most once
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.train_size // 5 and all(b[0].shape == (5, 3, 32, 32) for b in batches)
    rows = [int(np.flatnonzero((images == xi.numpy()).all(axis=(1, 2, 3)))[0]) for b in batches for xi in b[0]]
    assert len(set(rows)) == len(rows) and set(rows) <= set(dm.train_index.tolist())


def test_split_is_seeded_disjoint_and_complete(synthetic_small_h5):
    a = GalaxyDataModule(synthetic_small_h5, val_fraction=0.25, seed=3)
    b = GalaxyDataModule(synthetic_small_h5, val_fraction=0.25, seed=3)
    c = GalaxyDataModule(synthetic_small_h5, val_fraction=0.25, seed=4)
    assert np.array_equal(a.val_index, b.val_index) and not np.array_equal(a.val_index, c.val_index)
    assert a.train_size == 36 and len(a.val_index) == 12
    assert sorted(np.concatenate([a.train_index, a.val_index]).tolist()) == list(range(48))
    lim = GalaxyDataModule(synthetic_small_h5, val_fraction=0.25, seed=3, limit=20)
    assert lim.train_size + len(lim.val_index) == 20 and max(lim.train_index.max(), lim.val_index.max()) < 20
    assert lim.provenance["n"] == 20


def _epoch(dm):
    return [(x.clone(), y.clone()) for x, y in dm.train_dataloader()] + [(x, y) for x, y in dm.val_dataloader()]


def test_streaming_in_memory_and_workers_give_identical_batches(synthetic_small_h5):
    kw = dict(batch_size=4, val_fraction=0.25, seed=7)
    ref = GalaxyDataModule(synthetic_small_h5, in_memory=True, **kw)
    ref.setup("fit")
    assert ref.loaded_in_memory is True
    expected = _epoch(ref)
    for in_memory, workers in ((False, 0), (False, 2), (True, 2)):
        dm = GalaxyDataModule(synthetic_small_h5, in_memory=in_memory, num_workers=workers, **kw)
        dm.setup("fit")
        assert dm.loaded_in_memory is in_memory
        got = _epoch(dm)
        assert len(got) == len(expected)
        assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(got, expected))
        assert dm.normalisation == ref.normalisation
    # a different seed shuffles differently
    other = GalaxyDataModule(synthetic_small_h5, in_memory=True, batch_size=4, val_fraction=0.25, seed=8)
    assert not torch.equal(next(iter(other.train_dataloader()))[0], expected[0][0])


def test_clean_targets(synthetic_small_h5):
    dm = GalaxyDataModule(synthetic_small_h5, targets=None, target_kind="clean", batch_size=4, seed=0)
    _, clean = _file_arrays(synthetic_small_h5)
    x, t = next(iter(dm.val_dataloader()))
    assert dm.has_clean and np.array_equal(t.numpy(), clean[dm.val_index[:4]]) and not torch.equal(x, t)


def test_normalisation_is_robust_noise_sigma_of_training_stamps(synthetic_small_h5, tmp_path):
    from cosmolit.synthetic import write_synthetic_dataset

    dm = GalaxyDataModule(synthetic_small_h5, val_fraction=0.25, seed=2)
    images, _ = _file_arrays(synthetic_small_h5)
    train = images[dm.train_index]  # (36, 3, 32, 32), all training stamps (fewer than the cap)
    expected = []
    for b in range(3):
        v = train[:, b].ravel().astype(np.float64)
        expected.append(1.4826 * np.median(np.abs(v - np.median(v))))
    assert np.allclose(dm.normalisation, expected, rtol=1e-6)
    assert all(s > 0 for s in dm.normalisation)
    # the noiseless version of the same galaxies falls back to a fraction of the bright pixels
    quiet = write_synthetic_dataset(tmp_path / "quiet.h5", n=24, bands="gri", size=32, seed=5, noise=False, clean=False)
    q = GalaxyDataModule(quiet, val_fraction=0.25, seed=2).normalisation
    assert all(np.isfinite(s) and s > 0 for s in q)
    assert band_scale(np.zeros(100, np.float32)) == 1.0
    v = np.zeros(1000)
    v[:3] = 50.0  # MAD 0: 1e-2 x the 99.9th percentile of |v|
    assert band_scale(v) == pytest.approx(1e-2 * np.percentile(np.abs(v), 99.9))


def test_setup_is_idempotent_and_provenance(synthetic_small_h5):
    dm = GalaxyDataModule(synthetic_small_h5, seed=5)
    dm.setup("fit")
    train = dm._train
    dm.setup("validate")
    assert dm._train is train
    prov = dm.provenance
    assert {"path", "seed", "n", "format_version", "cosmolit_version"} <= set(prov)
    assert prov["seed"] == 5 and prov["n"] == 48 and prov["path"].endswith("synthetic_small.h5")
    assert dm.info.bands == "gri" and dm.info.stamp == (32, 32)


def test_nan_pixels_are_refused_with_their_place(synthetic_small_h5, tmp_path):
    import shutil

    bad = tmp_path / "bad.h5"
    shutil.copy(synthetic_small_h5, bad)
    with h5py.File(bad, "r+") as f:
        f["images"][30, 1, 4, 5] = np.nan
        f["images"][31, 0, 0, 0] = np.inf
    with pytest.raises(UsageError, match=r"2 NaN/Inf.*first at stamp 30 band 1 pixel \(4, 5\)"):
        GalaxyDataModule(bad).setup("fit")


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(val_fraction=0.0), "val_fraction"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(targets=("e1", "size")), "size"),
    (dict(target_kind="noisy"), "target_kind"),
    (dict(limit=0), "limit"),
])
def test_bad_settings_are_usage_errors(synthetic_small_h5, kw, match):
    with pytest.raises(UsageError, match=match):
        GalaxyDataModule(synthetic_small_h5, **kw)


def test_missing_file_and_too_large_batch(synthetic_small_h5, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        GalaxyDataModule(tmp_path / "nope.h5")
    dm = GalaxyDataModule(synthetic_small_h5, batch_size=64)
    with pytest.raises(UsageError, match="fewer than one batch"):
        dm.train_dataloader()
