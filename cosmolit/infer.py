"""Run a trained model over a dataset file, stream by stream, without a Trainer.

Used by `cosmolit predict`, `cosmolit evaluate` and `cosmolit generate`.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np

from cosmolit.dataset import DatasetWriter, inspect_dataset, iter_images, read_targets, read_truth
from cosmolit.errors import CosmolitError, UsageError


def inference_device(accelerator: str) -> str:
    """'auto' | 'cpu' | 'gpu' -> a torch device string for plain-torch inference."""
    import torch

    if accelerator not in ("auto", "cpu", "gpu"):
        raise UsageError(f"--accelerator {accelerator!r} is not allowed here; choose auto, cpu or gpu")
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise UsageError("--accelerator gpu: no CUDA device is visible to torch")
    return "cuda" if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()) else "cpu"


def predict_shapes(model, kind: str, path, batch_size: int = 64, samples: int | None = None,
                   device: str = "cpu", progress: bool = True, limit: int | None = None,
                   seed: int | None = 0) -> dict[str, np.ndarray]:
    """Predictions of a shape model over a file (its first `limit` stamps; all when None): mean
    (N, T), cov (N, T, T) and, for the BNN, aleatoric_cov and epistemic_cov (N, T, T). The BNN's
    weight draws come from `seed` (None: torch's global generator), the same draws for every
    batch, so a stamp's prediction does not depend on the batch size."""
    import torch

    from cosmolit.progress import progress_bar

    info = inspect_dataset(path, require_truth=())
    model = model.to(device).eval()
    out: dict[str, list] = {}
    n = info.n if limit is None else min(int(limit), info.n)
    with torch.no_grad(), progress_bar(n, "predicting", enabled=progress) as advance:
        for _, block in iter_images(path, batch_size, limit=n):
            x = torch.from_numpy(block).to(device)
            kwargs = {"samples": samples or int(model.hparams.get("samples", 100)), "seed": seed} if kind == "bnn" else {}
            parts = model.estimate(x, **kwargs)
            for key, value in parts.items():
                out.setdefault(key, []).append(value.detach().float().cpu().numpy())
            advance(len(block))
    return {k: np.concatenate(v) for k, v in out.items()}


def write_predictions(out: Path, data: Path, preds: dict[str, np.ndarray], targets: list[str],
                      attrs: dict, batch_size: int = 256) -> None:
    """A dataset-format file: the input images and truth, plus predictions/<key> arrays."""
    info = inspect_dataset(data, require_truth=())
    truth = read_truth(data)
    extras = {f"predictions/{k}": (v.shape[1:], "f4") for k, v in preds.items()}
    file_attrs = {k: v for k, v in info.attrs.items() if k not in ("cosmolit_version",)}
    file_attrs.update(attrs)
    file_attrs["prediction_targets"] = ",".join(targets)
    dtypes = {k: v.dtype.str for k, v in truth.items()}
    with DatasetWriter(out, info.n, info.bands, info.height, info.width, list(truth), attrs=file_attrs,
                       truth_dtypes=dtypes, extras=extras, chunk=min(64, info.n)) as w:
        for start, block in iter_images(data, batch_size):
            stop = start + len(block)
            w.write(start, block, {k: v[start:stop] for k, v in truth.items()},
                    extra={f"predictions/{k}": v[start:stop] for k, v in preds.items()})


MAX_REDRAWS = 20  # rounds of drawing implausible generated stamps again before giving up
REDRAWN_WHY = "their decoded pixels were not finite or absurd (latents from the flow's far tail)"


def generate_images(model, n: int, seed: int, batch_size: int = 500, prior: bool = False,
                    device: str = "cpu", progress: bool = True) -> tuple[np.ndarray, int]:
    """(n generated stamps (n, B, H, W) in electrons, reproducible for a seed; how many were drawn
    again). A stamp the model calls implausible (GalaxyVAE.implausible: a non-finite or absurd pixel)
    is replaced by the next draw of the same generator, so the output stays reproducible and finite;
    CosmolitError if a batch is still implausible after MAX_REDRAWS rounds (a broken model)."""
    import torch

    from cosmolit.progress import progress_bar

    model = model.to(device).eval()
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    chunks, redrawn = [], 0
    with torch.no_grad(), progress_bar(n, "generating", enabled=progress) as advance:
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            imgs = model.sample(m, generator=gen, from_flow=not prior)
            bad, rounds = model.implausible(imgs), 0
            while bad.any():
                if rounds == MAX_REDRAWS:
                    raise CosmolitError(f"{int(bad.sum())} of {m} generated galaxies still have non-finite or absurd "
                                        f"pixels after {MAX_REDRAWS} redraws: the checkpoint's decoder or flow is broken")
                k, rounds = int(bad.sum()), rounds + 1
                redrawn += k
                imgs[bad] = model.sample(k, generator=gen, from_flow=not prior)
                bad = model.implausible(imgs)
            chunks.append(imgs.detach().float().cpu().numpy())
            advance(m)
    return np.concatenate(chunks), redrawn


def load_images(path, limit: int | None = None, batch_size: int = 256, dataset: str = "images") -> np.ndarray:
    """Stamps of a file (the first `limit`; `dataset` "images" or "clean"), checked for NaN/Inf."""
    return np.concatenate([block for _, block in iter_images(path, batch_size, dataset, limit)])


def calibrate_checkpoint(ckpt: Path, data: Path, out: Path, batch_size: int = 64, device: str = "cpu",
                         progress: bool = True, echo=None, allow_training_data: bool = False) -> dict:
    """Measure a shape network's response and uncertainty calibration again on a dataset of its own
    (usually a simulation much larger than the validation split, never the test set) and write the
    checkpoint with it to `out`. The weights are untouched; the new calibration replaces the old and
    is recorded, with the dataset's path, seed, size and fingerprint, under
    checkpoint["cosmolit"]["calibration"]. The training file is refused unless `allow_training_data`.
    Returns that record."""
    import torch

    from cosmolit.checkpoint import load_model, refuse_overlap, save_checkpoint_atomic
    from cosmolit.dataset import dataset_fingerprint
    from cosmolit.models.targets import calibrate

    model, kind, checkpoint = load_model(ckpt)
    if kind == "vae":
        raise UsageError(f"checkpoint {str(ckpt)!r} holds a vae model; only cnn and bnn checkpoints are calibrated")
    targets = list(model.hparams["targets"])
    info = inspect_dataset(data, require_truth=targets)
    model.check_compatible(info, echo=echo)
    refuse_overlap(checkpoint, data, ("training",), allow_training_data,
                   "calibrate on a simulation of its own (its training galaxies give a biased response)")
    truth = read_targets(data, targets)  # (n, T), finite
    batches = ((torch.from_numpy(block), torch.from_numpy(truth[start:start + len(block)]))
               for start, block in iter_images(data, batch_size))
    found = calibrate(model.to(device), batches, echo=echo, progress=progress, n=info.n, source=str(data))
    state = checkpoint["state_dict"]
    for name, value in model.state_dict().items():
        if name.startswith("target_transform."):
            state[name] = value.detach().cpu().clone()
    record = {"path": str(Path(data).resolve()), "seed": int(info.seed), "n": int(info.n),
              "fingerprint": dataset_fingerprint(data), **found}
    meta = dict(checkpoint.get("cosmolit") or {})
    meta["calibration"] = record
    checkpoint["cosmolit"] = meta
    save_checkpoint_atomic(checkpoint, out)
    return record
