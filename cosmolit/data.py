"""GalaxyDataModule: batches of stamps from a cosmolit dataset file (cosmolit.dataset format).

Batches:
- target_kind="truth": (x (B, C, H, W) float32 raw electrons, y (B, T) float32 truth columns
  in the order of `targets`) for the shape networks;
- target_kind="clean": (x, clean (B, C, H, W)) for the VAE, the file's noiseless `clean` stamps,
  or x itself when the file has none (`has_clean` False: the VAE is then an autoencoder).
- inputs="clean": x is read from the noiseless `clean` stamps instead of `images` (the VAE with
  `inputs: clean`, an autoencoder of noiseless galaxies); the per-band normalisation still comes
  from the noisy images, whose noise sets the scale.

Split: a seeded permutation (numpy default_rng(seed)) sends round(val_fraction * n) stamps to
validation and the rest to training. The training order depends only on (seed, epoch)
(EpochShuffleSampler, so a resumed run sees the same batches) and the loader drops the last incomplete batch (static shapes, as the IPU needs); the validation loader
keeps the file order and every stamp.

Several processes (DDP, `--devices N`): inside a Trainer with world size W, rank r trains on every
W-th stamp of the epoch's order from position r, W shards of equal length (the last
len % W stamps of the order are left out that epoch), and validates on every W-th validation stamp
from position r; the model reduces the validation means over the ranks (cosmolit.models.base). The
split, the normalisation and the target statistics are computed from the whole file in every
process, so they are those of one device. Outside a fit (`full_val_dataloader`, and every loader
once `sharded` is False) each process sees every stamp.

Fresh noise (renoise=True): the training inputs are the file's noiseless `scene` stamps (target +
neighbours) plus new noise drawn for every stamp in every epoch, Gaussian with the variance of the
simulator's Poisson noise, sky_level_b + max(scene, 0) electrons (the normal limit of the Poisson
counts; LSST's sky is 1,600 to 300,000 electrons per pixel at 10-year depth). The noise of stamp row r
in epoch k comes from numpy default_rng([seed, k, r, 1]), so it too depends only on (seed, epoch).
The network then never sees one noise realisation twice and cannot learn it; validation keeps the
stored noisy `images`.

Targets: `target_stats` gives the mean and standard deviation of each truth column over the
training split; the shape networks standardise their targets with them. The same seed gives the same batches whatever
`num_workers` and whether the images are held in memory or streamed from the file.

Memory: in_memory=None loads the stamps when they take at most a quarter of the available RAM,
else streams them from HDF5 (one file handle per worker process; a batch is read in one call).
With renoise, only the rows that are read are held: the training split's scenes, and the
validation split's images (with the training images the normalisation samples).

Normalisation (per band, from training stamps only): scale_b = 1.4826 x MAD of the pixel values
of up to 2000 evenly spaced training stamps (a robust estimate of the noise sigma); for noiseless
data where that is ~0, 1e-2 x the 99.9th percentile of |pixel|, and 1.0 if that is 0 too. The
models feed asinh(x / scale_b) to their networks (cosmolit.models.base).
"""

from __future__ import annotations


import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from cosmolit.dataset import DatasetInfo, dataset_fingerprint, inspect_dataset
from cosmolit.errors import UsageError

TARGET_KINDS = ("truth", "clean")
NOISE_STREAM = 1  # last entry of the seed of the fresh noise, default_rng([seed, epoch, row, NOISE_STREAM])
DATA_INPUTS = ("images", "clean")  # the stamps the network sees: noisy images, or the noiseless ones
MAD_TO_SIGMA = 1.4826
NORM_STAMPS = 2000  # at most this many training stamps for the normalisation
NORM_PIXELS = 1 << 22  # and at most this many pixel values per band
RAM_FRACTION = 0.25  # in_memory=None loads the images when they fit in this share of available RAM
CHUNK = 256  # stamps per read while scanning the file


def available_memory() -> int:
    """Bytes of RAM available now (MemAvailable on Linux), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def band_scale(values: np.ndarray) -> float:
    """Robust noise sigma of pixel values (1-D) with the noiseless fall-back; never 0."""
    values = values.astype(np.float64, copy=False)
    med = np.median(values)
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(values - med)))
    peak = float(np.percentile(np.abs(values), 99.9))
    if sigma > 1e-6 * peak and sigma > 0:
        return sigma
    if peak > 0:
        return 1e-2 * peak
    return 1.0


# ---------------------------------------------------------------- augmentation
# The eight symmetries of the square pixel grid (the dihedral group D4), applied to training
# stamps as a flip of the columns (bit 0), of the rows (bit 1), then a transpose (bit 2). They
# are exact for cosmolit's data: round PSFs, square pixels, galaxies at the stamp centre (up to
# one pixel for even stamps). Distortions / shears are spin-2: a transpose swaps x and y
# (e1 -> -e1), one flip reverses handedness (e2 -> -e2), whatever the sign convention.
AUGMENT_GROUP = 8
SPIN2_SIGNS = {"e1": (-1.0, 1.0), "e2": (1.0, -1.0), "g1": (-1.0, 1.0), "g2": (1.0, -1.0)}  # (transpose, one flip)
_INVARIANT = re.compile(r"(redshift|mag_\w+|hlr|bulge_frac|snr|sed_type|catalog_row|is_blend|n_neighbors|"
                        r"blendedness|nb\d+_mag_\w+)$")


def augment_signs(targets: Sequence[str], setting: str = "data.augment") -> np.ndarray:
    """(T, 2) sign of each truth target under a transpose and under one flip; UsageError naming
    `setting` for a target whose behaviour under the grid's symmetries is not known (e.g.
    neighbour offsets)."""
    unknown = [t for t in targets if t not in SPIN2_SIGNS and not _INVARIANT.match(t)]
    if unknown:
        raise UsageError(f"{setting.split('.')[-1]}: the targets {unknown} may change under rotations and flips of "
                         f"the stamp in a way cosmolit does not know (it knows e1, e2, g1, g2 and orientation-free "
                         f"columns such as redshift, magnitudes, hlr); set {setting}: false")
    return np.array([SPIN2_SIGNS.get(t, (1.0, 1.0)) for t in targets], dtype=np.float32).reshape(len(targets), 2)


def apply_symmetry(stamp: np.ndarray, g: int) -> np.ndarray:
    """Element g (0..7) of D4 applied to the last two axes of (..., H, W) (a view)."""
    if g & 1:
        stamp = stamp[..., ::-1]
    if g & 2:
        stamp = stamp[..., ::-1, :]
    if g & 4:
        stamp = np.swapaxes(stamp, -1, -2)
    return stamp


def items_per_epoch(n: int, augment: bool) -> int:
    """How many distinct items an EpochShuffleSampler encodes per epoch: one per (stamp, symmetry)."""
    return n * (AUGMENT_GROUP if augment else 1)


class EpochShuffleSampler:
    """Training order that depends only on (seed, epoch), and can skip the batches already done.

    Lightning calls `set_epoch(epoch)` before every training epoch (also after a resume), so an
    interrupted and resumed run sees the same batches, in the same order, as an uninterrupted
    one. `skip` (stamps) drops the start of the next epoch's order once: the batches a
    mid-epoch checkpoint had already trained on. With `augment`, each item is
    position * AUGMENT_GROUP + g, g the grid symmetry drawn for that stamp in that epoch: the
    augmentation too depends only on (seed, epoch), not on the number of workers. With
    `with_epoch` (fresh noise), epoch * n * G is added to each item (G = AUGMENT_GROUP with
    augment, else 1), so that the dataset knows the epoch of the noise it draws.
    """

    def __init__(self, n: int, seed: int, augment: bool = False, with_epoch: bool = False):
        self.n, self.seed, self.epoch, self.skip = int(n), int(seed), 0, 0
        self.augment = bool(augment)
        self.with_epoch = bool(with_epoch)
        self.rank, self.world = 0, 1  # this process's shard of every epoch's order (see the module docstring)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_shard(self, rank: int, world: int) -> None:
        if not 0 <= int(rank) < int(world):
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        self.rank, self.world = int(rank), int(world)

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        if self.augment:
            order = order * AUGMENT_GROUP + rng.integers(0, AUGMENT_GROUP, self.n)
        if self.with_epoch:
            order = order + self.epoch * items_per_epoch(self.n, self.augment)
        order = order[self.rank:len(self) * self.world:self.world]  # the whole order when world is 1
        skip, self.skip = self.skip, 0
        return iter(order[skip:].tolist())


class _Stamps(Dataset):
    """Stamps `index` (file rows, sorted) of a dataset file, as (x, target) pairs of float32 tensors.

    arrays: {"images": ndarray (n_file, C, H, W) or a _RowSubset, "clean": ...} already in memory,
    or None to read from `path` lazily. targets: (len(index), T) float32, or None to return the clean
    stamps (or the images themselves when clean is False). signs: (T, 2) from `augment_signs`
    to take items encoded by an augmenting EpochShuffleSampler (None: plain positions).
    noise: (sky_level (C,), seed) to add fresh noise to the inputs (the `scene` stamps), items
    then carrying their epoch (EpochShuffleSampler with_epoch); None: inputs as stored.
    """

    def __init__(self, path: str, index: np.ndarray, targets: Optional[np.ndarray], clean: bool,
                 arrays: Optional[dict] = None, signs: Optional[np.ndarray] = None, inputs: str = "images",
                 noise: Optional[tuple[np.ndarray, int]] = None):
        self.path, self.index, self.targets, self.clean, self.arrays = path, index, targets, clean, arrays
        self.inputs = inputs  # the file dataset x is read from: images, clean, or scene
        self.signs = signs
        self.noise = noise
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # an open h5py file does not pickle; each worker opens its own
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    def _read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), C, H, W) for sorted, distinct file rows."""
        if self.arrays is not None:
            return self.arrays[name][rows]
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return np.asarray(self._file[name][rows], dtype=np.float32)

    def __getitems__(self, items):
        """Several items in one read (the DataLoader calls this for a whole batch)."""
        pos = np.asarray(items, dtype=np.int64)
        sym = epoch = None
        if self.noise is not None:
            epoch, pos = np.divmod(pos, items_per_epoch(len(self.index), self.signs is not None))
        if self.signs is not None:
            pos, sym = np.divmod(pos, AUGMENT_GROUP)
        rows = self.index[pos]
        uniq, inverse = np.unique(rows, return_inverse=True)  # h5py needs increasing rows
        x = self._read(self.inputs, uniq)[inverse]  # (b, C, H, W)
        if self.noise is not None:
            x = self._add_noise(x, rows, epoch)
        if self.targets is not None:
            t = self.targets[pos]  # (b, T)
        elif self.clean:
            t = self._read("clean", uniq)[inverse]  # (b, C, H, W)
        else:
            t = x
        if sym is not None:
            x = [apply_symmetry(x[k], g) for k, g in enumerate(sym)]
            if self.targets is not None:
                transpose, one_flip = (sym & 4) > 0, ((sym & 1) ^ ((sym >> 1) & 1)) > 0  # (b,) each
                t = t * np.where(transpose[:, None], self.signs[:, 0], 1.0) * np.where(one_flip[:, None], self.signs[:, 1], 1.0)
                t = t.astype(np.float32)
            elif self.clean:
                t = [apply_symmetry(t[k], g) for k, g in enumerate(sym)]
            else:
                t = x
        return [(torch.from_numpy(np.ascontiguousarray(x[k])), torch.from_numpy(np.ascontiguousarray(t[k])))
                for k in range(len(pos))]

    def __getitem__(self, i):
        return self.__getitems__([int(i)])[0]

    def _add_noise(self, scene: np.ndarray, rows: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """scene (b, C, H, W) + Gaussian noise of variance sky + max(scene, 0), seeded per (epoch, row)."""
        sky, seed = self.noise
        out = np.empty_like(scene)
        for k, (row, epoch) in enumerate(zip(rows.tolist(), epochs.tolist())):
            z = np.random.default_rng([seed, epoch, row, NOISE_STREAM]).standard_normal(scene.shape[1:], dtype=np.float32)
            out[k] = scene[k] + z * np.sqrt(sky + np.maximum(scene[k], 0.0))
        return out


class _RowSubset:
    """Some rows of a file's stamp array held in memory, indexed by file row like the full array."""

    def __init__(self, rows: np.ndarray, array: np.ndarray):
        self.rows, self.array = rows, array  # rows sorted and distinct; array (len(rows), C, H, W)

    def __getitem__(self, rows) -> np.ndarray:
        return self.array[np.searchsorted(self.rows, rows)]


class GalaxyDataModule(pl.LightningDataModule):
    """Seeded train/validation loaders over one dataset file, with per-band normalisation."""

    def __init__(
        self,
        path,
        targets: Optional[Sequence[str]] = ("e1", "e2", "redshift"),
        target_kind: str = "truth",
        batch_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        in_memory: Optional[bool] = None,
        limit: Optional[int] = None,
        augment: bool = False,
        inputs: str = "images",
        renoise: bool = False,
        batches_per_step: int = 1,
    ):
        super().__init__()
        if inputs not in DATA_INPUTS:
            raise UsageError(f"inputs {inputs!r} is not allowed; choose one of {', '.join(DATA_INPUTS)}")
        if target_kind not in TARGET_KINDS:
            raise UsageError(f"target_kind {target_kind!r} is not allowed; choose one of {', '.join(TARGET_KINDS)}")
        targets = list(targets) if targets is not None else []
        if target_kind == "truth" and not targets:
            raise UsageError("target_kind 'truth' needs at least one truth column in targets, e.g. e1, e2, redshift")
        if len(set(targets)) != len(targets):
            raise UsageError(f"targets must be distinct, got {targets}")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size}")
        if not (isinstance(val_fraction, (int, float)) and 0.0 < float(val_fraction) < 1.0):
            raise UsageError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
        if int(num_workers) < 0:
            raise UsageError(f"num_workers must be 0 or more, got {num_workers}")
        if isinstance(batches_per_step, bool) or int(batches_per_step) != batches_per_step or batches_per_step <= 0:
            raise UsageError(f"batches_per_step must be a positive integer, got {batches_per_step}")
        if limit is not None and int(limit) <= 0:
            raise UsageError(f"limit must be a positive number of stamps or null, got {limit}")
        self.path = str(path)
        self.targets = targets if target_kind == "truth" else []
        self.target_kind = target_kind
        self.batch_size, self.val_fraction, self.seed = int(batch_size), float(val_fraction), int(seed)
        self.num_workers, self.in_memory, self.limit = int(num_workers), in_memory, limit
        self.augment = bool(augment)
        # a training batch holds this many batches one after another (the K optimizer steps of one
        # static-graph Lightning step); validation batches hold batch_size stamps
        self.batches_per_step = int(batches_per_step)
        self._signs = augment_signs(self.targets) if self.augment else None
        self._info = inspect_dataset(self.path, require_truth=self.targets)
        self.inputs = inputs
        if inputs == "clean" and not self._info.has_clean:
            raise UsageError(f"dataset {self.path!r} has no noiseless 'clean' stamps to use as inputs; "
                             "simulate it with cosmolit simulate (which writes them) or train on the noisy images")
        self.renoise = bool(renoise)
        self._sky = self._check_renoise() if self.renoise else None
        self.n = min(self._info.n, int(limit)) if limit is not None else self._info.n
        n_val = int(round(self.n * self.val_fraction))
        n_val = min(max(n_val, 1), self.n - 1)
        if self.n < 2:
            raise UsageError(f"dataset {self.path!r} has {self.n} stamp(s); a train/validation split needs at least 2")
        perm = np.random.default_rng(self.seed).permutation(self.n)
        self.val_index = np.sort(perm[:n_val])
        self.train_index = np.sort(perm[n_val:])
        self._normalisation: Optional[list[float]] = None
        self._target_stats: Optional[list[list[float]]] = None
        self._train: Optional[_Stamps] = None
        self._val: Optional[_Stamps] = None
        self.loaded_in_memory: Optional[bool] = None
        self.sharded = True  # inside a multi-process fit, each process reads its own shard (_shard)

    def _check_renoise(self) -> np.ndarray:
        """float32 (C, 1, 1) sky level of each band, for data.renoise; UsageError when it cannot be used."""
        if self.inputs != "images":
            raise UsageError(f"renoise draws fresh noise for the noisy inputs; it cannot be used with inputs: {self.inputs}")
        if not self._info.has_scene:
            raise UsageError(f"renoise needs the noiseless scenes, and dataset {self.path!r} has no 'scene' stamps; "
                             "simulate it with `cosmolit simulate --scene` or set renoise: false")
        sky = np.asarray(self._info.attrs.get("sky_level", []), dtype=np.float32).ravel()
        if sky.shape != (len(self._info.bands),) or not np.all(np.isfinite(sky)) or np.any(sky < 0):
            raise UsageError(f"renoise needs the attribute sky_level (electrons per pixel, one per band) in "
                             f"{self.path!r}; it is missing or invalid: {self._info.attrs.get('sky_level')!r}")
        return sky.reshape(-1, 1, 1)

    # ------------------------------------------------------------------ properties
    @property
    def info(self) -> DatasetInfo:
        return self._info

    @property
    def has_clean(self) -> bool:
        return bool(self._info.has_clean)

    @property
    def train_size(self) -> int:
        return len(self.train_index)

    @property
    def val_size(self) -> int:
        return len(self.val_index)

    @property
    def normalisation(self) -> list[float]:
        if self._normalisation is None:
            self.setup("fit")
        return list(self._normalisation)

    @property
    def target_stats(self) -> list[list[float]]:
        """[[mean, std], ...] of each truth target over the training split (std 1.0 where it is 0)."""
        if self._target_stats is None:
            self.setup("fit")
        return [list(p) for p in self._target_stats]

    @property
    def provenance(self) -> dict:
        from cosmolit import __version__

        return {"path": str(Path(self.path).resolve()), "seed": self.seed, "n": int(self.n),
                "format_version": int(self._info.format_version), "cosmolit_version": str(__version__),
                "dataset_seed": int(self._info.seed), "pixel_scale": float(self._info.pixel_scale),
                "psf_fwhm": [float(x) for x in self._info.psf_fwhm],
                "sky_level": [float(x) for x in np.atleast_1d(self._info.attrs.get("sky_level", []))],
                "fingerprint": dataset_fingerprint(self.path)}

    # ------------------------------------------------------------------ setup
    def _use_memory(self, rows: dict) -> bool:
        if self.in_memory is not None:
            return bool(self.in_memory)
        c, h, w = len(self._info.bands), self._info.height, self._info.width
        need = sum(self.n if r is None else len(r) for r in rows.values()) * c * h * w * 4
        return need <= RAM_FRACTION * available_memory()

    def _held_rows(self) -> dict:
        """{stamp array: the sorted file rows that training and validation read from it, or None for
        all n}. Only with renoise is that a part: the scenes of the training split, and the images of
        the validation split plus the training images that set the normalisation."""
        rows: dict = {name: None for name in self._stamp_names()}
        if self.renoise:
            rows["scene"] = self.train_index
            rows["images"] = np.union1d(self.val_index, self._normalisation_rows())
        return rows

    def _normalisation_rows(self) -> np.ndarray:
        """Sorted file rows of the training stamps the normalisation is measured on."""
        h, w = self._info.height, self._info.width
        k = max(1, min(NORM_STAMPS, self.train_size, NORM_PIXELS // (h * w)))
        return np.unique(self.train_index[np.linspace(0, self.train_size - 1, k).round().astype(np.int64)])

    def _scan(self, rows: dict, keep: bool) -> dict:
        """Read the first n stamps of each array in `rows` (see _held_rows) chunk by chunk: refuse
        NaN / Inf, and when `keep`, return {name: the array, or a _RowSubset of the rows named}."""
        import h5py

        from cosmolit.progress import progress_bar

        out = {}
        with h5py.File(self.path, "r") as f, progress_bar(self.n * len(rows), "checking stamps",
                                                          enabled=self.n > 20 * CHUNK) as advance:
            for name, held in rows.items():
                ds = f[name]
                n_held = self.n if held is None else len(held)
                arr = np.empty((n_held,) + tuple(ds.shape[1:]), dtype=np.float32) if keep else None
                for start in range(0, self.n, CHUNK):
                    stop = min(start + CHUNK, self.n)
                    block = np.asarray(ds[start:stop], dtype=np.float32)  # (b, C, H, W)
                    bad = ~np.isfinite(block)
                    if bad.any():
                        where = np.argwhere(bad)[0]
                        count = int(bad.sum())
                        raise UsageError(
                            f"dataset {self.path!r}: '{name}' holds {count} NaN/Inf pixel(s) in stamps {start}-{stop - 1}, "
                            f"the first at stamp {start + int(where[0])} band {int(where[1])} pixel "
                            f"({int(where[2])}, {int(where[3])}); clean or drop those stamps first"
                        )
                    if keep and held is None:
                        arr[start:stop] = block
                    elif keep:
                        lo, hi = np.searchsorted(held, [start, stop])
                        arr[lo:hi] = block[held[lo:hi] - start]
                    advance(stop - start)
                if keep:
                    out[name] = arr if held is None else _RowSubset(held, arr)
        return out

    def _compute_normalisation(self, arrays: Optional[dict]) -> list[float]:
        pick = self._normalisation_rows()
        # always the noisy images, also when the network sees the clean stamps: their noise sets the
        # scale of the asinh stretch (noiseless stamps have no noise floor, their MAD is 0)
        if arrays is not None and "images" in arrays:
            sample = arrays["images"][pick]
        else:
            import h5py

            with h5py.File(self.path, "r") as f:
                sample = np.asarray(f["images"][pick], dtype=np.float32)  # (k, C, H, W)
        return [band_scale(sample[:, b].ravel()) for b in range(len(self._info.bands))]

    def _clean_targets(self) -> bool:
        """Whether the clean stamps are read beside the inputs (with clean inputs the target is x itself)."""
        return self.target_kind == "clean" and self.has_clean and self.inputs == "images"

    def _stamp_names(self) -> list[str]:
        """The file's stamp arrays that training and validation read."""
        return [self.inputs] + (["clean"] if self._clean_targets() else []) + (["scene"] if self.renoise else [])

    def setup(self, stage: Optional[str] = None) -> None:
        if self._train is not None:
            return
        clean = self._clean_targets()
        rows = self._held_rows()
        keep = self._use_memory(rows)
        arrays = self._scan(rows, keep)
        self._normalisation = self._compute_normalisation(arrays if keep else None)
        truth = None
        if self.targets:
            from cosmolit.dataset import read_targets

            truth = read_targets(self.path, self.targets, self.n)  # (n, T)
        self._target_stats = []
        if truth is not None:
            train_truth = truth[self.train_index].astype(np.float64)  # (n_train, T)
            std = train_truth.std(0)
            self._target_stats = [[float(m), float(v) if v > 0 else 1.0] for m, v in zip(train_truth.mean(0), std)]
        held = arrays if keep else None

        def part(index, signs=None, inputs=self.inputs, noise=None):
            return _Stamps(self.path, index, None if truth is None else truth[index], clean, held, signs, inputs, noise)

        if self.renoise:  # training on the scenes plus fresh noise, validation on the stored images
            self._train = part(self.train_index, self._signs, "scene", (self._sky, self.seed))
        else:
            self._train = part(self.train_index, self._signs)
        self._val = part(self.val_index)
        self.train_sampler = EpochShuffleSampler(len(self.train_index), self.seed, augment=self.augment,
                                                 with_epoch=self.renoise)
        self.loaded_in_memory = keep

    # ------------------------------------------------------------------ loaders
    @property
    def train_batch_size(self) -> int:
        """Stamps per training batch: batch_size x batches_per_step."""
        return self.batch_size * self.batches_per_step

    def _shard(self) -> tuple[int, int]:
        """(rank, world size) of this process in the Trainer's DDP run; (0, 1) outside one, on an IPU
        (whose replicas share one process) and once `sharded` is False."""
        from cosmolit.runtime import on_ipu

        trainer = getattr(self, "trainer", None)
        if not self.sharded or trainer is None or trainer.world_size <= 1 or on_ipu(self):
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _loader(self, ds: _Stamps, train: bool, shard: tuple[int, int] = (0, 1)) -> DataLoader:
        kwargs = dict(batch_size=self.train_batch_size if train else self.batch_size, num_workers=self.num_workers,
                      persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
        if train:
            self.train_sampler.set_shard(*shard)
            return DataLoader(ds, sampler=self.train_sampler, drop_last=True, **kwargs)
        # An IPU runs a static graph: every batch, validation included, must have the same shape.
        from cosmolit.runtime import on_ipu

        rank, world = shard
        if world > 1:  # every world-th validation stamp, in file order
            return DataLoader(ds, sampler=list(range(rank, len(ds), world)), **kwargs)
        return DataLoader(ds, shuffle=False, drop_last=on_ipu(self), **kwargs)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        rank, world = self._shard()
        if self.train_size // world < self.train_batch_size:
            each = f" ({self.train_size // world} for each of {world} processes)" if world > 1 else ""
            raise UsageError(f"the training split has {self.train_size} stamps{each}, fewer than one batch of "
                             f"{self.train_batch_size}; use a smaller batch_size or more data")
        return self._loader(self._train, train=True, shard=(rank, world))

    def val_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self._val, train=False, shard=self._shard())

    def full_val_dataloader(self) -> DataLoader:
        """Every validation stamp, in file order, in every process (calibration after a fit)."""
        self.setup("fit")
        return self._loader(self._val, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


__all__ = ["GalaxyDataModule", "EpochShuffleSampler", "band_scale", "available_memory", "TARGET_KINDS"]

