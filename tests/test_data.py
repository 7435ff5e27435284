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


@pytest.mark.parametrize("in_memory", [True, False])
def test_clean_inputs_feed_the_noiseless_stamps_and_refuse_a_file_without_them(synthetic_small_h5, tmp_path, in_memory):
    from cosmolit.data import AUGMENT_GROUP, apply_symmetry
    from cosmolit.synthetic import write_synthetic_dataset

    images, clean = _file_arrays(synthetic_small_h5)
    dm = GalaxyDataModule(synthetic_small_h5, targets=None, target_kind="clean", batch_size=4, seed=0,
                          inputs="clean", in_memory=in_memory, augment=True)
    x, t = next(iter(dm.val_dataloader()))
    assert np.array_equal(x.numpy(), clean[dm.val_index[:4]]) and torch.equal(x, t)
    (x3, t3), = dm._train.__getitems__([2 * AUGMENT_GROUP + 5])  # augmented: input and target turn together
    assert np.array_equal(x3.numpy(), apply_symmetry(clean[dm.train_index[2]], 5)) and torch.equal(x3, t3)
    noisy = GalaxyDataModule(synthetic_small_h5, targets=None, target_kind="clean", batch_size=4, seed=0)
    assert dm.normalisation == noisy.normalisation  # scaled by the noise of the images, not the clean stamps
    with pytest.raises(UsageError, match="no noiseless 'clean' stamps"):
        GalaxyDataModule(write_synthetic_dataset(tmp_path / "noclean.h5", n=8, bands="gri", size=32, clean=False),
                         targets=None, target_kind="clean", inputs="clean")
    with pytest.raises(UsageError, match="inputs 'truth' is not allowed"):
        GalaxyDataModule(synthetic_small_h5, targets=None, target_kind="clean", inputs="truth")


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


def _moment_e(img):
    """Distortion (e1, e2) of an image (H, W) from unweighted second moments about its centroid."""
    h, w = img.shape
    y, x = np.mgrid[:h, :w].astype(np.float64)
    f = img.astype(np.float64)
    cx, cy = (f * x).sum() / f.sum(), (f * y).sum() / f.sum()
    ixx, iyy, ixy = ((f * (x - cx) ** 2).sum(), (f * (y - cy) ** 2).sum(), (f * (x - cx) * (y - cy)).sum())
    return np.array([(ixx - iyy) / (ixx + iyy), 2 * ixy / (ixx + iyy)])


def test_augmentation_applies_grid_symmetries_and_transforms_ellipticity_alike(synthetic_small_h5):
    """Each of the 8 symmetries moves the pixels exactly, and the e1, e2 targets change sign as the
    image's own measured ellipticity does; orientation-free targets stay; clean stamps follow x."""
    from cosmolit.data import AUGMENT_GROUP, apply_symmetry

    dm = GalaxyDataModule(synthetic_small_h5, targets=("e1", "e2", "redshift"), batch_size=4, seed=0,
                          in_memory=True, augment=True)
    dm.setup("fit")
    vae_dm = GalaxyDataModule(synthetic_small_h5, targets=None, target_kind="clean", batch_size=4, seed=0,
                              in_memory=True, augment=True)
    vae_dm.setup("fit")
    ds, vds = dm._train, vae_dm._train
    pos = 3
    (x0, y0), = ds.__getitems__([pos * AUGMENT_GROUP])  # g = 0: the stamp as stored
    (_, c0), = vds.__getitems__([pos * AUGMENT_GROUP])
    images, clean = _file_arrays(synthetic_small_h5)
    assert np.array_equal(x0.numpy(), images[dm.train_index[pos]])
    e0 = _moment_e(c0.numpy().sum(0))
    assert np.all(np.abs(e0) > 1e-3)
    seen = set()
    for g in range(AUGMENT_GROUP):
        (x, y), = ds.__getitems__([pos * AUGMENT_GROUP + g])
        assert np.array_equal(x.numpy(), apply_symmetry(x0.numpy(), g))
        (xv, c), = vds.__getitems__([pos * AUGMENT_GROUP + g])
        assert np.array_equal(c.numpy(), apply_symmetry(c0.numpy(), g)) and torch.equal(xv, x)
        e = _moment_e(c.numpy().sum(0))
        assert np.allclose(np.abs(e), np.abs(e0), atol=1e-9)
        assert np.array_equal(np.sign(y[:2].numpy()) * np.sign(y0[:2].numpy()), np.sign(e) * np.sign(e0))
        assert torch.allclose(y[:2].abs(), y0[:2].abs()) and y[2] == y0[2]
        seen.add(tuple(np.sign(e) * np.sign(e0)))
    assert seen == {(1, 1), (1, -1), (-1, 1), (-1, -1)}
    # the validation split is never augmented
    xv0, _ = next(iter(dm.val_dataloader()))
    assert np.array_equal(xv0.numpy(), images[dm.val_index[:4]])


def test_augmented_batches_depend_only_on_seed_and_epoch(synthetic_small_h5):
    kw = dict(targets=("e1", "e2"), batch_size=4, val_fraction=0.25, seed=7, augment=True)
    ref = GalaxyDataModule(synthetic_small_h5, in_memory=True, **kw)
    ref.setup("fit")
    plain = GalaxyDataModule(synthetic_small_h5, in_memory=True, **{**kw, "augment": False})
    plain.setup("fit")
    expected = _epoch(ref)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(expected, _epoch(plain)))  # it does transform
    dm = GalaxyDataModule(synthetic_small_h5, in_memory=False, num_workers=2, **kw)
    dm.setup("fit")
    got = _epoch(dm)
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(got, expected))
    ref.train_sampler.set_epoch(1)
    assert not torch.equal(next(iter(ref.train_dataloader()))[0], expected[0][0])


def test_augmentation_refuses_targets_it_cannot_transform(tmp_path):
    from cosmolit.data import augment_signs

    assert augment_signs(["e2", "redshift", "mag_i", "g1"]).tolist() == [[1, -1], [1, 1], [1, 1], [-1, 1]]
    with pytest.raises(UsageError, match=r"augment: the targets \['nb0_dx'\].*data.augment: false"):
        augment_signs(["e1", "nb0_dx"])


def _scene_file(path, n=24, bands="gri", size=16, sky=(100.0, 400.0, 900.0), scene=True, seed=0):
    """A dataset with noiseless scenes (non-negative blobs), images = scene + Gaussian noise, and sky_level."""
    from cosmolit.dataset import DatasetWriter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    blobs = np.exp(-(xx**2 + yy**2) / 8.0)[None, None] * rng.uniform(100, 5000, (n, len(bands), 1, 1))
    scenes = blobs.astype(np.float32)
    images = (scenes + rng.normal(size=scenes.shape) * np.sqrt(np.asarray(sky)[None, :, None, None] + scenes)).astype(np.float32)
    truth = {"e1": rng.uniform(-0.5, 0.5, n), "e2": rng.uniform(-0.5, 0.5, n), "redshift": rng.uniform(0, 2, n)}
    with DatasetWriter(path, n, bands, size, size, list(truth), attrs={"sky_level": np.asarray(sky)},
                       scene=scene) as w:
        w.write(0, images, truth, scene=scenes if scene else None)
    return path, images, scenes


def test_fresh_noise_is_new_every_epoch_around_the_scene_and_validation_keeps_the_images(tmp_path):
    path, images, scenes = _scene_file(tmp_path / "s.h5", n=40)
    sky = np.array([100.0, 400.0, 900.0], np.float32)[:, None, None]
    dm = GalaxyDataModule(path, batch_size=8, val_fraction=0.2, seed=3, renoise=True, augment=False, in_memory=True)
    dm.setup("fit")
    epochs = []
    for epoch in (0, 1):
        dm.train_sampler.set_epoch(epoch)
        rows = dm.train_index[np.asarray(list(dm.train_sampler)) % dm.train_size]
        x = torch.cat([b[0] for b in dm.train_dataloader()]).numpy()  # (32, C, H, W), rows in sampler order
        pulls = (x - scenes[rows]) / np.sqrt(sky + scenes[rows])
        assert abs(pulls.std() - 1) < 0.03 and abs(pulls.mean()) < 0.03
        assert not np.array_equal(x, images[rows])  # not the stored realisation
        epochs.append(dict(zip(rows.tolist(), x)))
    row = dm.train_index[0]
    assert not np.array_equal(epochs[0][row], epochs[1][row])  # a new realisation each epoch
    xv = torch.cat([b[0] for b in dm.val_dataloader()]).numpy()
    assert np.array_equal(xv, images[dm.val_index])


def test_fresh_noise_depends_only_on_seed_and_epoch(tmp_path):
    path, _, _ = _scene_file(tmp_path / "s.h5", n=40)
    kw = dict(targets=("e1", "e2"), batch_size=4, val_fraction=0.25, seed=7, augment=True, renoise=True)
    ref = GalaxyDataModule(path, in_memory=True, **kw)
    ref.setup("fit")
    ref.train_sampler.set_epoch(2)
    expected = _epoch(ref)
    dm = GalaxyDataModule(path, in_memory=False, num_workers=2, **kw)
    dm.setup("fit")
    dm.train_sampler.set_epoch(2)
    got = _epoch(dm)
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(got, expected))
    other = GalaxyDataModule(path, in_memory=True, **{**kw, "seed": 8})
    other.setup("fit")
    other.train_sampler.set_epoch(2)
    assert not torch.equal(_epoch(other)[0][0], expected[0][0])


def test_fresh_noise_holds_only_the_rows_it_reads(tmp_path, monkeypatch):
    """With renoise, memory holds the training scenes and the validation images (plus the training
    images of the normalisation), not both arrays whole; in_memory=None counts only those."""
    import cosmolit.data as data

    path, images, scenes = _scene_file(tmp_path / "s.h5", n=40)
    monkeypatch.setattr(data, "NORM_STAMPS", 4)
    stamp_bytes = 3 * 16 * 16 * 4
    # room for 50 stamps: the 32 training scenes + 8 validation and 4 normalisation images (44),
    # not the 80 of both arrays whole
    monkeypatch.setattr(data, "available_memory", lambda: int(50 * stamp_bytes / data.RAM_FRACTION))
    dm = GalaxyDataModule(path, batch_size=8, val_fraction=0.2, seed=3, renoise=True, in_memory=None)
    dm.setup("fit")
    assert dm.loaded_in_memory
    held = dm._train.arrays
    assert np.array_equal(held["scene"].rows, dm.train_index)
    assert len(held["images"].rows) == 12 and set(dm.val_index) <= set(held["images"].rows)
    assert np.array_equal(held["scene"][dm.train_index[[3, 5]]], scenes[dm.train_index[[3, 5]]])
    assert np.array_equal(torch.cat([b[0] for b in dm.val_dataloader()]).numpy(), images[dm.val_index])
    streamed = GalaxyDataModule(path, batch_size=8, val_fraction=0.2, seed=3, renoise=True, in_memory=False)
    assert streamed.normalisation == dm.normalisation
    monkeypatch.setattr(data, "available_memory", lambda: int(40 * stamp_bytes / data.RAM_FRACTION))
    small = GalaxyDataModule(path, batch_size=8, val_fraction=0.2, seed=3, renoise=True, in_memory=None)
    small.setup("fit")
    assert not small.loaded_in_memory


def test_fresh_noise_refuses_files_and_settings_it_cannot_use(tmp_path, synthetic_small_h5):
    with pytest.raises(UsageError, match="no 'scene' stamps.*simulate --scene"):
        GalaxyDataModule(synthetic_small_h5, renoise=True)
    with pytest.raises(UsageError, match="inputs: clean"):
        GalaxyDataModule(synthetic_small_h5, renoise=True, inputs="clean")
    path, _, _ = _scene_file(tmp_path / "s.h5")
    import h5py

    with h5py.File(path, "a") as f:
        del f.attrs["sky_level"]
    with pytest.raises(UsageError, match="sky_level"):
        GalaxyDataModule(path, renoise=True)
