"""The cosmolit dataset format: one HDF5 file, a contract that other tools can write too.

Layout (format_version 1)::

    images          float32 (N, B, H, W)  background-subtracted electrons per pixel, channels first
    clean           float32 (N, B, H, W)  optional: noiseless isolated target (denoising target)
    scene           float32 (N, B, H, W)  optional: noiseless scene, target + neighbours (images before
                                          noise; with attrs sky_level, fresh noise can be drawn)
    truth/<name>    1-D arrays of length N; at least e1, e2, redshift
    attrs:
      bands          str, one letter per channel in order, e.g. "ugrizy"
      pixel_scale    float, arcsec per pixel
      psf_fwhm       float array (B,), arcsec
      format_version int (1)
      seed           int (-1 when unknown)
      config         YAML text of the full configuration that made the file ("" when unknown)
      cosmolit_version str
      sky_level      float array (B,), mean sky [electrons / pixel] (simulated files): the Poisson
                     noise variance of a pixel is sky_level + scene

Files are written under a temporary name in the same folder and renamed when complete, so
a reader never sees a half-written file under the final name. SIGTERM during the write removes
the temporary file as Ctrl-C does; one left by a killed process is removed by the next write
of the same output.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from cosmolit.errors import UsageError

FORMAT_VERSION = 1
REQUIRED_TRUTH = ("e1", "e2", "redshift")
LSST_BANDS = "ugrizy"


@dataclass
class DatasetInfo:
    """What a reader needs to know about a dataset file, read from its header only."""

    path: str
    n: int
    bands: str
    height: int
    width: int
    pixel_scale: float
    psf_fwhm: list[float]
    seed: int
    config: str
    truth_names: list[str]
    has_clean: bool
    format_version: int
    cosmolit_version: str
    attrs: dict = field(default_factory=dict)
    has_scene: bool = False

    @property
    def stamp(self) -> tuple[int, int]:
        return (self.height, self.width)


def _attr_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype.kind in "SU":
        return "".join(v.decode() if isinstance(v, bytes) else str(v) for v in value)
    return str(value)


def inspect_dataset(path: str | Path, require_truth: Sequence[str] = REQUIRED_TRUTH) -> DatasetInfo:
    """Open `path`, check that it follows the format and return its description.

    Raises UsageError with one line naming the problem: missing file, not HDF5, missing
    `images` or truth columns, wrong dtype or rank, inconsistent lengths, empty dataset.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise UsageError(f"dataset {str(path)!r} does not exist")
    if path.is_dir():
        raise UsageError(f"dataset {str(path)!r} is a folder, not an HDF5 file")
    if not h5py.is_hdf5(path):
        raise UsageError(f"dataset {str(path)!r} is not an HDF5 file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UsageError(f"dataset {str(path)!r} cannot be opened as HDF5: {exc}") from None
    with f:
        if "images" not in f or not isinstance(f["images"], h5py.Dataset):
            raise UsageError(f"dataset {str(path)!r} has no 'images' array (expected float32 (N, bands, H, W))")
        images = f["images"]
        if images.ndim != 4:
            raise UsageError(
                f"dataset {str(path)!r}: 'images' has rank {images.ndim}, expected 4 (N, bands, H, W)"
            )
        if images.dtype.kind != "f":
            raise UsageError(f"dataset {str(path)!r}: 'images' has dtype {images.dtype}, expected float32")
        n, nb, h, w = images.shape
        if n == 0:
            raise UsageError(f"dataset {str(path)!r} is empty (0 images)")
        bands = _attr_str(f.attrs.get("bands", ""))
        if not bands:
            raise UsageError(f"dataset {str(path)!r} has no 'bands' attribute (e.g. 'ugrizy')")
        if len(bands) != nb:
            raise UsageError(
                f"dataset {str(path)!r}: attribute bands={bands!r} names {len(bands)} bands "
                f"but 'images' has {nb} channels"
            )
        truth_names: list[str] = []
        if "truth" in f:
            for name, ds in f["truth"].items():
                if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.shape[0] != n:
                    raise UsageError(
                        f"dataset {str(path)!r}: truth/{name} must be a 1-D array of length {n}, "
                        f"got shape {getattr(ds, 'shape', None)}"
                    )
                truth_names.append(name)
        missing = [t for t in require_truth if t not in truth_names]
        if missing:
            raise UsageError(
                f"dataset {str(path)!r} lacks truth column(s) {', '.join(missing)}; it has: "
                f"{', '.join(truth_names) or 'none'}"
            )
        for name in ("clean", "scene"):
            if name in f and tuple(f[name].shape) != tuple(images.shape):
                raise UsageError(
                    f"dataset {str(path)!r}: '{name}' has shape {f[name].shape}, expected {images.shape}"
                )
        psf = f.attrs.get("psf_fwhm", [float("nan")] * nb)
        psf = [float(x) for x in np.atleast_1d(psf)]
        version = int(f.attrs.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise UsageError(
                f"dataset {str(path)!r} has format_version {version}; this cosmolit reads up to {FORMAT_VERSION}"
            )
        return DatasetInfo(
            path=str(path),
            n=int(n),
            bands=bands,
            height=int(h),
            width=int(w),
            pixel_scale=float(f.attrs.get("pixel_scale", float("nan"))),
            psf_fwhm=psf,
            seed=int(f.attrs.get("seed", -1)),
            config=_attr_str(f.attrs.get("config", "")),
            truth_names=truth_names,
            has_clean="clean" in f,
            has_scene="scene" in f,
            format_version=version,
            cosmolit_version=_attr_str(f.attrs.get("cosmolit_version", "")),
            attrs={k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()},
        )


def read_targets(path: str | Path, names: Sequence[str], limit: int | None = None) -> np.ndarray:
    """float32 (n, T) truth columns `names` of the first `limit` stamps (all when None); UsageError
    naming the first NaN or Inf value."""
    cols = read_truth(path, names)
    truth = np.stack([np.asarray(cols[t][:limit], dtype=np.float32) for t in names], axis=1)  # (n, T)
    bad = ~np.isfinite(truth)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise UsageError(f"dataset {str(path)!r}: truth/{names[col]} is NaN/Inf for {int(bad.sum())} "
                         f"value(s), the first at stamp {int(row)}")
    return truth


def read_truth(path: str | Path, names: Sequence[str] | None = None, index=None) -> dict[str, np.ndarray]:
    """Truth columns as numpy arrays (all of them when `names` is None)."""
    import h5py

    with h5py.File(path, "r") as f:
        group = f["truth"] if "truth" in f else {}
        names = list(group.keys()) if names is None else list(names)
        out = {}
        for name in names:
            if name not in group:
                raise UsageError(f"dataset {str(path)!r} lacks truth column {name!r}")
            arr = group[name][()]
            out[name] = arr if index is None else arr[index]
        return out


def iter_images(path: str | Path, batch_size: int, dataset: str = "images",
                limit: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, float32 (b, B, H, W)) chunks of a dataset's images (the first `limit` stamps; all
    when None); UsageError on NaN or Inf pixels."""
    import h5py

    with h5py.File(path, "r") as f:
        ds = f[dataset]
        n = ds.shape[0] if limit is None else min(int(limit), ds.shape[0])
        for start in range(0, n, batch_size):
            block = np.asarray(ds[start : min(start + batch_size, n)], dtype=np.float32)
            bad = ~np.isfinite(block)
            if bad.any():
                first = start + int(np.argwhere(bad)[0][0])
                raise UsageError(
                    f"dataset {str(path)!r}: '{dataset}' holds NaN or Inf pixels ({int(bad.sum())} in stamps "
                    f"{start}-{start + len(block) - 1}, first in stamp {first}); clean the file first"
                )
            yield start, block


def check_output_path(path: str | Path, force: bool = False, what: str = "output") -> Path:
    """Refuse an existing output without --force, a folder, or a parent that cannot be written."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a folder; give a file name")
    if path.exists() and not force:
        raise UsageError(f"{what} {str(path)!r} already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"folder {str(parent)!r} for the {what} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"folder {str(parent)!r} for the {what} is not writable")
    return path


def format_bytes(n: float) -> str:
    """1.5e12 -> '1.5 TB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def check_free_space(path: str | Path, nbytes: int, what: str = "output") -> None:
    """Refuse, before anything is written, an output of about `nbytes` larger than the free space beside `path`."""
    parent = Path(path).parent if str(Path(path).parent) else Path(".")
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise UsageError(f"{what} {str(path)!r} needs about {format_bytes(nbytes)} but only {format_bytes(free)} "
                         f"are free in {str(parent)!r}")


class Terminated(SystemExit):
    """SIGTERM while an atomic write runs: unwinds like Ctrl-C (cleanup runs), then exit 143."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """In the main thread, turn SIGTERM into Terminated while the block runs, so that its cleanup runs.

    Left alone: another thread, or a SIGTERM handler already set (e.g. by `cosmolit fit`, or an
    enclosing block). A process forked inside the block keeps the default action (it exits at once).
    """
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked child: behave as the default handler
            os._exit(128 + signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise Terminated(128 + signum)

    previous = signal.getsignal(signal.SIGTERM)
    installed = False
    if previous in (signal.SIG_DFL, None):
        try:
            signal.signal(signal.SIGTERM, handler)
            installed = True
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def remove_stale_partials(path: str | Path, suffix: str = "") -> list[Path]:
    """Remove the temporary files of `path` (from atomic_path) left by processes that no longer run."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.\w+\.partial{re.escape(suffix)}")
    removed = []
    for p in (path.parent if str(path.parent) else Path(".")).iterdir():
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid: leave it alone
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    On any exception (including KeyboardInterrupt, and SIGTERM: see sigterm_raises) the temporary
    file is removed and `path` is left as it was. The temporary name holds the writer's pid, so that
    a file left by a killed (SIGKILL) run is removed by the next write of the same `path`.
    """
    path = Path(path)
    with sigterm_raises():
        remove_stale_partials(path, suffix)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".partial{suffix}",
                                   dir=path.parent or ".")
        os.close(fd)
        tmp_path = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        try:
            yield tmp_path
            if tmp_path.exists():  # mkstemp creates 0600; give the file the permissions of a normal one
                os.chmod(tmp_path, 0o666 & ~umask)
            os.replace(tmp_path, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
            raise


class DatasetWriter:
    """Write a dataset file chunk by chunk; it appears under its final name only when closed cleanly.

    >>> with DatasetWriter("set.h5", n=10, bands="ugrizy", height=64, width=64,
    ...                    truth_names=["e1", "e2", "redshift"], attrs={"seed": 1}) as w:
    ...     w.write(0, images, {"e1": e1, "e2": e2, "redshift": z})
    """

    def __init__(
        self,
        path: str | Path,
        n: int,
        bands: str,
        height: int,
        width: int,
        truth_names: Sequence[str],
        attrs: Mapping | None = None,
        clean: bool = False,
        scene: bool = False,
        truth_dtypes: Mapping[str, str] | None = None,
        chunk: int = 64,
        extras: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
    ):
        self.path = Path(path)
        self.n, self.bands, self.height, self.width = int(n), bands, int(height), int(width)
        self.truth_names = list(truth_names)
        self.attrs = dict(attrs or {})
        self.stamp_arrays = [name for name, on in (("clean", clean), ("scene", scene)) if on]  # beside images
        self.truth_dtypes = dict(truth_dtypes or {})
        self.chunk = max(1, min(int(chunk), self.n))
        # extra per-stamp arrays, name -> (shape after N, dtype), e.g. {"predictions/mean": ((3,), "f4")}
        self.extras = dict(extras or {})
        self._ctx = None
        self._file = None
        self.written = 0

    @property
    def nbytes(self) -> int:
        """Estimated size of the finished file: its arrays plus an allowance for HDF5 metadata."""
        per_stamp = 4 * len(self.bands) * self.height * self.width * (1 + len(self.stamp_arrays))
        per_stamp += sum(np.dtype(self.truth_dtypes.get(k, "f8")).itemsize for k in self.truth_names)
        per_stamp += sum(np.dtype(dtype).itemsize * int(np.prod(tail)) for tail, dtype in self.extras.values())
        return self.n * per_stamp + 2**16

    def __enter__(self) -> "DatasetWriter":
        import h5py

        from cosmolit import __version__

        check_free_space(self.path, self.nbytes)
        self._ctx = atomic_path(self.path, ".h5")
        tmp = self._ctx.__enter__()
        try:
            f = h5py.File(tmp, "w", track_order=True)
            shape = (self.n, len(self.bands), self.height, self.width)
            chunks = (self.chunk, len(self.bands), self.height, self.width)
            # track_times=False: the same content gives the same bytes.
            for name in ["images"] + self.stamp_arrays:
                f.create_dataset(name, shape=shape, dtype="f4", chunks=chunks, track_times=False)
            g = f.create_group("truth", track_order=True)
            for name in self.truth_names:
                g.create_dataset(
                    name, shape=(self.n,), dtype=self.truth_dtypes.get(name, "f8"), track_times=False
                )
            for name, (tail, dtype) in self.extras.items():
                f.create_dataset(name, shape=(self.n, *tail), dtype=dtype, track_times=False)
            attrs = {
                "format_version": FORMAT_VERSION,
                "bands": self.bands,
                "seed": -1,
                "config": "",
                "cosmolit_version": __version__,
            }
            attrs.update(self.attrs)
            for key, value in attrs.items():
                f.attrs[key] = value
            self._file = f
        except BaseException:
            self._ctx.__exit__(*__import__("sys").exc_info())
            raise
        return self

    def write(self, start: int, images: np.ndarray, truth: Mapping[str, np.ndarray], clean: np.ndarray | None = None,
              extra: Mapping[str, np.ndarray] | None = None, scene: np.ndarray | None = None):
        stop = start + len(images)
        for name, values in (extra or {}).items():
            self._file[name][start:stop] = np.asarray(values)
        self._file["images"][start:stop] = np.asarray(images, dtype=np.float32)
        given = {"clean": clean, "scene": scene}
        for name in self.stamp_arrays:
            if given[name] is None:
                raise ValueError(f"this writer stores '{name}' stamps; pass {name}=")
            self._file[name][start:stop] = np.asarray(given[name], dtype=np.float32)
        for name in self.truth_names:
            self._file["truth"][name][start:stop] = np.asarray(truth[name])
        self.written += len(images)

    def __exit__(self, exc_type, exc, tb):
        f, self._file = self._file, None
        if f is not None:
            f.close()
        if exc_type is None and self.written != self.n:
            exc_type = RuntimeError
            exc = RuntimeError(f"DatasetWriter wrote {self.written} of {self.n} stamps")
            tb = None
            self._ctx.__exit__(exc_type, exc, tb)
            raise exc
        return self._ctx.__exit__(exc_type, exc, tb)


def dataset_fingerprint(path: str | Path) -> str:
    """A short content hash of a dataset file: its images' shape, bands and first and last stamps.
    The same for a copy or a moved file; another simulation (seed, config, shard) differs."""
    import hashlib

    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        images = f["images"]
        bands = f.attrs.get("bands", "")
        h = hashlib.sha256(repr((tuple(images.shape), bands.decode() if isinstance(bands, bytes) else str(bands)))
                           .encode())
        for k in sorted({0, images.shape[0] - 1}):
            h.update(np.ascontiguousarray(images[k], dtype="<f4").tobytes())
    return h.hexdigest()[:16]
