"""`cosmolit fit | evaluate | predict | generate`: thin commands over cosmolit.train and cosmolit.infer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cosmolit.cli._app import command
from cosmolit.errors import UsageError

MODEL_HELP = "Model: cnn (shape CNN), bnn (Pyro Bayesian CNN) or vae (generative VAE)."


def _positive(value: Optional[int], name: str) -> Optional[int]:
    if value is not None and value <= 0:
        raise UsageError(f"{name} must be a positive integer, got {value}")
    return value


@command("fit")
def fit_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", "-d", help="Training dataset (.h5, cosmolit format)."),
    out: Path = typer.Option(Path("runs/fit"), "--out", "-o", help="Output folder: checkpoints, logs, model.ckpt."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML preset (configs/cnn.yaml, ...)."),
    accelerator: Optional[str] = typer.Option(None, "--accelerator", "-a", help="auto, cpu, gpu or ipu."),
    devices: Optional[int] = typer.Option(None, "--devices", help="Number of GPUs (DDP) or IPUs (replicas)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Micro-batch size."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", help="Number of epochs."),
    precision: Optional[str] = typer.Option(None, "--precision", help="32-true, 16-mixed or bf16-mixed."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of weights init, shuffling and sampling."),
    early_stopping: Optional[int] = typer.Option(None, "--early-stopping", help="Stop after N epochs without val_loss improvement."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the network (cpu, gpu; not ipu): 1.2x to 1.5x faster CPU steps."),
    static_graph: Optional[bool] = typer.Option(None, "--static-graph/--no-static-graph", help="Capture each training step in a CUDA graph (default: on for one GPU at 32-true)."),
    device_iterations: Optional[int] = typer.Option(None, "--device-iterations", help="Optimizer steps per host call (ipu; gpu in static-graph mode)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.ckpt."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a model on a dataset and save Lightning checkpoints (best, last, model.ckpt)."""
    from cosmolit.models import MODEL_KINDS
    from cosmolit.train import fit

    if model not in MODEL_KINDS:
        raise UsageError(f"unknown model {model!r}; choose one of {', '.join(MODEL_KINDS)}")
    _positive(batch_size, "--batch-size")
    _positive(epochs, "--epochs")
    _positive(devices, "--devices")
    _positive(device_iterations, "--device-iterations")
    overrides = {
        "data": {"batch_size": batch_size},
        "trainer": {"accelerator": accelerator, "devices": devices, "epochs": epochs, "precision": precision,
                    "seed": seed, "early_stopping_patience": early_stopping, "compile": compile_,
                    "static_graph": static_graph, "device_iterations": device_iterations},
    }
    result = fit(model, data, out, config=config, overrides=overrides, resume=resume, force=force,
                 progress=not quiet, echo=typer.echo)
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:  # DDP: the other processes of the run stay quiet
        return
    val = result.metrics.get("val_loss")
    typer.echo("")
    typer.echo(f"trained {model} on {result.accelerator}" + (f"; final val_loss {val:.4g}" if val is not None else ""))
    typer.echo(f"  model checkpoint  {result.checkpoint}")
    if result.best is not None:
        typer.echo(f"  best checkpoint   {result.best}")
    typer.echo(f"  last checkpoint   {result.last}")
    typer.echo(f"  logs (CSV)        {result.logs}/metrics.csv")
    typer.echo(f"next: cosmolit evaluate --ckpt {result.checkpoint} --data DATA.h5 --out {result.out}/eval")


@command("evaluate")
def evaluate_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="A checkpoint written by cosmolit fit."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset to evaluate on (not the training set)."),
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="Output folder: metrics.json, report.md, plots."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Refuse a checkpoint of another model kind."),
    samples: Optional[int] = typer.Option(None, "--samples", help="BNN weight samples per stamp (default: the model's)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    n_generate: int = typer.Option(1000, "--n-generate", help="VAE: galaxies generated for the comparison "
                                   "(as many simulated stamps are compared and reconstructed)."),
    no_hsm: bool = typer.Option(False, "--no-hsm", help="Skip the GalSim HSM baseline."),
    limit: Optional[int] = typer.Option(None, "--limit", help="CNN, BNN: evaluate the first N stamps only "
                                        "(default: all). For a VAE, --n-generate sets the number."),
    accelerator: str = typer.Option("auto", "--accelerator", "-a", help="auto, cpu or gpu (inference)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the BNN's weight draws and of the VAE's generation."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing metrics.json."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    allow_training_data: bool = typer.Option(False, "--allow-training-data", help="Accept the checkpoint's training or calibration "
                                             "file as --data (the report says so)."),
) -> None:
    """Measure a model against truth (and GalSim HSM); write metrics.json, report.md and plots."""
    from cosmolit.checkpoint import load_model, refuse_overlap
    from cosmolit.dataset import inspect_dataset, iter_images, read_truth
    from cosmolit.infer import REDRAWN_WHY, generate_images, inference_device, load_images, predict_shapes

    _positive(batch_size, "--batch-size")
    _positive(samples, "--samples")
    _positive(n_generate, "--n-generate")
    _positive(limit, "--limit")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} is a file; give a folder for --out")
    if (out / "metrics.json").exists() and not force:
        raise UsageError(f"{str(out / 'metrics.json')!r} already exists; pass --force to overwrite it")
    device = inference_device(accelerator)
    net, kind, checkpoint = load_model(ckpt, expected=model)
    targets = list(net.hparams.get("targets", []) or [])
    info = inspect_dataset(data, require_truth=targets)
    if limit is not None and kind == "vae":
        raise UsageError("--limit applies to CNN and BNN checkpoints; for a VAE, --n-generate sets how many stamps are compared")
    warnings = net.check_compatible(info, echo=typer.echo)
    overlap = refuse_overlap(checkpoint, data, ("training", "calibration"), allow_training_data,
                             "evaluate on stamps the model has not seen (another seed)")
    if overlap:
        typer.echo(f"warning: evaluating on the checkpoint's {' and '.join(overlap)} file (--allow-training-data)")
    n = info.n if limit is None else min(limit, info.n)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        progress = not quiet
        if kind == "vae":
            from cosmolit.measure.report import evaluate_generation

            # a VAE fitted on a file with clean stamps is a denoiser and generates noiseless
            # galaxies: compare them with the noiseless simulated stamps, not the noisy ones
            reference = "clean" if info.has_clean else "images"
            real = load_images(data, limit=max(n_generate, 16), dataset=reference)
            generated, redrawn = generate_images(net, n_generate, seed, device=device, progress=progress)
            # reconstructions of the same stamps, to tell the autoencoder's shape errors from the flow's
            recon = _reconstructions(net, data, real, reference, device)
            snr = _truth_column(data, "snr", len(real))
            metrics = evaluate_generation(out, real, generated, info.bands, info.pixel_scale,
                                          reconstructions=recon, progress=progress, reference=reference, snr=snr,
                                          redrawn=redrawn, data_overlap=overlap, warnings=warnings)
        else:
            from cosmolit.measure.report import evaluate_shapes

            preds = predict_shapes(net, kind, data, batch_size=batch_size, samples=samples, device=device,
                                   progress=progress, limit=n, seed=seed)
            truth = {k: v[:n] for k, v in read_truth(data).items()}
            import numpy as np

            y = np.stack([truth[t] for t in targets], axis=1).astype(np.float64)
            metrics = evaluate_shapes(
                out, y, preds["mean"], preds["cov"], targets, truth,
                (lambda: iter_images(data, 256, limit=n)) if not no_hsm else None, info, kind,
                epistemic_cov=preds.get("epistemic_cov"), hsm=not no_hsm, progress=progress,
                response=net.target_transform.responses(), sigma_scale=net.target_transform.sigma_scales(),
                calibration_source=(checkpoint.get("cosmolit") or {}).get("calibration"),
                data_overlap=overlap, warnings=warnings, bnn_seed=seed if kind == "bnn" else None,
            )
    except BaseException:
        if created:  # nothing half-written: drop the folder this run made
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    typer.echo(f"evaluated {kind} checkpoint {ckpt} on {data} ({n if kind != 'vae' else len(real)} of {info.n} stamps)")
    if metrics.get("n_redrawn"):
        typer.echo(f"  {metrics['n_redrawn']} generated galaxies drawn again: {REDRAWN_WHY}")
    for key in ("e1", "e2"):
        if isinstance(metrics.get(key), dict):
            m = metrics[key]
            line = f"  {key}: rmse {m['rmse']:.4f}  m {m['m']:+.4f} +- {m['m_err']:.4f}  c {m['c']:+.5f} +- {m['c_err']:.5f}"
            reg = (metrics.get("hsm_regauss") or {}).get(key)
            if isinstance(reg, dict):
                line += f"   (HSM REGAUSS rmse {reg['rmse']:.4f}, m {reg['m']:+.3f})"
            if m.get("rmse_zero") is not None:
                line += f"\n      rmse of e = 0 for every galaxy {m['rmse_zero']:.4f}"
            if m.get("rmse_uncalibrated") is not None:
                line += f"; of the network before its response removal {m['rmse_uncalibrated']:.4f}"
            typer.echo(line)
    typer.echo(f"  metrics  {out / 'metrics.json'}")
    typer.echo(f"  report   {out / 'report.md'}")


def _reconstructions(net, data, targets, reference: str, device, batch: int = 256):
    """(inputs, targets, reconstructions) of the first len(targets) stamps, each (n, B, H, W) float32.

    `targets` are those stamps as already read from the file's `reference` dataset (clean when the
    file has it); the inputs are read only when the encoder sees another dataset."""
    import h5py
    import numpy as np
    import torch

    targets = np.asarray(targets, dtype=np.float32)
    k = len(targets)
    # a VAE trained on the noiseless stamps (inputs: clean) is shown those
    source = "clean" if net.hparams.get("inputs") == "clean" and reference == "clean" else "images"
    if source == reference:
        inputs = targets
    else:
        with h5py.File(data, "r") as f:
            inputs = np.asarray(f[source][:k], dtype=np.float32)
    net = net.to(device)
    with torch.no_grad():
        recon = np.concatenate([net.reconstruct(torch.from_numpy(inputs[i:i + batch]).to(device)).float().cpu().numpy()
                                for i in range(0, k, batch)])
    return inputs, targets, recon


def _truth_column(data, name: str, n: int):
    """The first n values of a truth column, or None when the file has no such column."""
    from cosmolit.dataset import read_truth

    try:
        return read_truth(data, [name])[name][:n]
    except UsageError:
        return None


@command("predict")
def predict_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="A CNN or BNN checkpoint written by cosmolit fit."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset (.h5) to run the model on."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dataset (.h5): images, truth and predictions/."),
    samples: Optional[int] = typer.Option(None, "--samples", help="BNN weight samples per stamp (default 100)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    accelerator: str = typer.Option("auto", "--accelerator", "-a", help="auto, cpu or gpu."),
    seed: int = typer.Option(0, "--seed", help="Seed of the BNN's weight draws."),
    force: bool = typer.Option(False, "--force"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Predict shapes (and uncertainties) for every stamp; writes the dataset format plus predictions/."""
    from cosmolit.checkpoint import load_model
    from cosmolit.dataset import check_output_path, inspect_dataset
    from cosmolit.infer import inference_device, predict_shapes, write_predictions

    _positive(batch_size, "--batch-size")
    _positive(samples, "--samples")
    check_output_path(out, force)
    device = inference_device(accelerator)
    net, kind, _ = load_model(ckpt)
    if kind == "vae":
        raise UsageError(f"checkpoint {str(ckpt)!r} holds a vae model; predict needs a cnn or bnn (use generate)")
    info = inspect_dataset(data, require_truth=())
    net.check_compatible(info, echo=typer.echo)
    preds = predict_shapes(net, kind, data, batch_size=batch_size, samples=samples, device=device, progress=not quiet,
                           seed=seed)
    targets = list(net.hparams["targets"])
    write_predictions(out, data, preds, targets, {"prediction_checkpoint": str(ckpt), "prediction_model": kind})
    typer.echo(f"wrote predictions of {', '.join(targets)} for {info.n} stamps to {out} "
               f"(predictions/{', predictions/'.join(preds)})")


@command("calibrate")
def calibrate_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="A CNN or BNN checkpoint written by cosmolit fit."),
    data: Path = typer.Option(..., "--data", "-d", help="Calibration dataset (.h5) with truth: not the test set."),
    out: Path = typer.Option(..., "--out", "-o", help="The recalibrated checkpoint (.ckpt) to write."),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    accelerator: str = typer.Option("auto", "--accelerator", "-a", help="auto, cpu or gpu."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out (even --ckpt itself)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    allow_training_data: bool = typer.Option(False, "--allow-training-data", help="Accept the checkpoint's training file as --data."),
) -> None:
    """Measure a shape network's response (1 + m, c) and uncertainty calibration again on a larger
    simulation and write a checkpoint that removes them; the weights are unchanged."""
    from cosmolit.dataset import check_output_path
    from cosmolit.infer import calibrate_checkpoint, inference_device

    _positive(batch_size, "--batch-size")
    check_output_path(out, force, what="--out")
    device = inference_device(accelerator)
    record = calibrate_checkpoint(ckpt, data, out, batch_size=batch_size, device=device, progress=not quiet,
                                  echo=typer.echo, allow_training_data=allow_training_data)
    typer.echo(f"calibrated {ckpt} on {data} ({record['n']} stamps, seed {record['seed']})")
    for name, r in record["response"].items():
        typer.echo(f"  {name}: response 1 + m = {r['slope']:.4f}, c = {r['intercept']:+.5f}; removed from predictions")
    typer.echo("  factor on sigma: " + ", ".join(f"{name} {v:.3f}" for name, v in record["sigma_scale"].items()))
    typer.echo(f"  checkpoint  {out}")


@command("generate")
def generate_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="A VAE checkpoint written by cosmolit fit --model vae."),
    n: int = typer.Option(..., "--n", help="Number of galaxies to generate."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dataset (.h5)."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write a grid of the first galaxies as PNG."),
    seed: int = typer.Option(0, "--seed"),
    prior: bool = typer.Option(False, "--prior", help="Sample latents from N(0, I) instead of the fitted flow."),
    batch_size: int = typer.Option(500, "--batch-size", "-b"),
    accelerator: str = typer.Option("auto", "--accelerator", "-a", help="auto, cpu or gpu."),
    force: bool = typer.Option(False, "--force"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Generate galaxy images with a trained VAE (flow or prior latents); writes the dataset format."""
    import numpy as np

    from cosmolit.checkpoint import load_model
    from cosmolit.dataset import DatasetWriter, check_output_path
    from cosmolit.infer import REDRAWN_WHY, generate_images, inference_device

    _positive(n, "--n")
    _positive(batch_size, "--batch-size")
    check_output_path(out, force)
    if png is not None:
        check_output_path(png, force, what="PNG")
    device = inference_device(accelerator)
    net, _, ckpt_data = load_model(ckpt, expected="vae")
    images, redrawn = generate_images(net, n, seed, batch_size=batch_size, prior=prior, device=device,
                                      progress=not quiet)
    hp = net.hparams
    bands, stamp = str(hp["bands"]), int(hp["stamp"])
    nan = np.full(n, np.nan)
    attrs = {"pixel_scale": float((hp.get("provenance") or {}).get("pixel_scale", 0.2)),
             "psf_fwhm": np.asarray((hp.get("provenance") or {}).get("psf_fwhm", [np.nan] * len(bands)), float),
             "seed": seed, "generator": f"cosmolit generate ({'prior' if prior else 'flow'})", "n_redrawn": redrawn,
             "config": f"generate: {{ckpt: {str(ckpt)!r}, n: {n}, seed: {seed}, prior: {str(prior).lower()}}}\n"}
    with DatasetWriter(out, n, bands, stamp, stamp, ["e1", "e2", "redshift", "is_generated"], attrs=attrs) as w:
        w.write(0, images, {"e1": nan, "e2": nan, "redshift": nan, "is_generated": np.ones(n)})
    typer.echo(f"generated {n} galaxies ({bands}, {stamp}x{stamp}) -> {out}")
    if redrawn:
        typer.echo(f"  {redrawn} drawn again: {REDRAWN_WHY}")
    if png is not None:
        from cosmolit.measure.plots import stamp_grid

        stamp_grid(images[:64], bands, png)
        typer.echo(f"grid of the first {min(n, 64)} -> {png}")
