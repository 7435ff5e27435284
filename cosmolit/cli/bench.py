"""`cosmolit bench train | generate | overhead | plot`: timings comparable with the study's."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cosmolit.cli._app import app, command, parse_int_list
from cosmolit.errors import UsageError

bench_app = typer.Typer(name="bench", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                        help="Benchmarks: training step time, VAE generation time, overheads, comparison figures.")
app.add_typer(bench_app, name="bench")

CONFIG_HELP = "YAML preset (configs/bench.yaml); command-line options override it."


def _section(config: Optional[Path], name: str, schema, overrides: dict):
    """One section of a bench YAML (train / generate / overhead), overridden by CLI values, validated."""
    from cosmolit.config import from_dict, read_yaml

    raw = read_yaml(config) if config is not None else {}
    where = Path(config).name if config is not None else "bench"
    unknown = [k for k in raw if k not in ("train", "generate", "overhead")]
    if unknown:
        raise UsageError(f"{where}: unknown section {unknown[0]!r}; allowed: train, generate, overhead")
    data = dict(raw.get(name) or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(schema, data, f"{where}.{name}")


def _check_out(out: Path, force: bool) -> None:
    from cosmolit.dataset import check_output_path

    check_output_path(out, force=force, what="results file")


@command("train", app_=bench_app)
def train_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="cnn or bnn (default: cnn)."),
    accelerator: Optional[str] = typer.Option(None, "--accelerator", "-a", help="cpu, gpu, ipu or auto (default: cpu)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", "-b", help="Comma-separated (default: 2,4,8,14)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Timed steps per batch size (default: 20)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Timed epochs of --epoch-images images instead of steps."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Untimed first steps (default: 3)."),
    warmup_epochs: Optional[int] = typer.Option(None, "--warmup-epochs", help="Untimed first epochs with --epochs (default: 1)."),
    epoch_images: Optional[int] = typer.Option(None, "--epoch-images", help="Images per epoch with --epochs (default: 8000)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="lightning, bare or static (default: lightning)."),
    loss: Optional[str] = typer.Option(None, "--loss", help="cnn: mse (the study's timing runs) or nll."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads."),
    interop_threads: Optional[int] = typer.Option(None, "--interop-threads", help="torch inter-op threads."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="channels_last memory format."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the network, as fit --compile (falls back to eager)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="32-true, bf16-mixed, 16-mixed (lightning mode)."),
    device_iterations: Optional[int] = typer.Option(None, "--device-iterations", help="Steps per host call (static, static graph, ipu)."),
    static_graph: Optional[bool] = typer.Option(None, "--static-graph/--no-static-graph", help="lightning mode: fit's step captured in a CUDA graph (gpu)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    label: Optional[str] = typer.Option(None, "--label", help="Legend of this run in plots."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Results JSON (schema cosmolit-bench/1)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing results file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Time training steps of the shape CNN or BNN on synthetic stamps (64x64x6, 3 targets)."""
    from cosmolit.bench.results import write_results
    from cosmolit.bench.train import TrainBenchConfig, run_train_bench

    _check_out(out, force)
    if steps is not None and epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    overrides = {
        "model": model, "accelerator": accelerator,
        "batch_sizes": parse_int_list(batch_sizes, "--batch-sizes") if batch_sizes is not None else None,
        "steps": steps, "epochs": epochs, "warmup_steps": warmup_steps, "warmup_epochs": warmup_epochs,
        "epoch_images": epoch_images, "mode": mode, "loss": loss, "threads": threads,
        "interop_threads": interop_threads, "channels_last": channels_last, "compile": compile_,
        "precision": precision, "device_iterations": device_iterations, "seed": seed,
        "static_graph": static_graph,
    }
    cfg = _section(config, "train", TrainBenchConfig, overrides)
    if epochs is not None:
        cfg.steps = None
    payload = run_train_bench(cfg, echo=typer.echo, progress=not quiet, label=label)
    write_results(out, payload, force=force)
    typer.echo(f"wrote {out}")
    typer.echo(f"next: cosmolit bench plot {out} --reference paper --out {out.with_suffix('.png')}")


@command("generate", app_=bench_app)
def generate_cmd(
    accelerator: Optional[str] = typer.Option(None, "--accelerator", "-a", help="cpu, gpu or auto (default: cpu)."),
    n: Optional[str] = typer.Option(None, "--n", help="Numbers of images (default: 1,10,100,500,1000,5000)."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="A VAE checkpoint (default: untrained VAE, timing only)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed calls per n (default: 3)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Samples generated before timing (default: 100)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="eager or static (CUDA graph) (default: eager)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    label: Optional[str] = typer.Option(None, "--label", help="Legend of this run in plots."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Results JSON."),
    force: bool = typer.Option(False, "--force"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Time VAE generation (latent flow sampling + decoding) of n galaxies, after a warm-up."""
    from cosmolit.bench.generate import GenerateBenchConfig, run_generate_bench
    from cosmolit.bench.results import write_results

    _check_out(out, force)
    if ckpt is not None and not ckpt.is_file():
        raise UsageError(f"checkpoint {str(ckpt)!r} does not exist")
    overrides = {"accelerator": accelerator, "n": parse_int_list(n, "--n") if n is not None else None,
                 "ckpt": str(ckpt) if ckpt is not None else None, "repeats": repeats, "warmup": warmup,
                 "mode": mode, "threads": threads, "seed": seed}
    cfg = _section(config, "generate", GenerateBenchConfig, overrides)
    payload = run_generate_bench(cfg, echo=typer.echo, progress=not quiet, label=label)
    write_results(out, payload, force=force)
    typer.echo(f"wrote {out}")


@command("overhead", app_=bench_app)
def overhead_cmd(
    accelerator: Optional[str] = typer.Option(None, "--accelerator", "-a", help="cpu, gpu or auto (default: cpu)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="cnn batch (default: 32)."),
    bnn_batch_size: Optional[int] = typer.Option(None, "--bnn-batch-size", help="BNN batch (default: 32)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Timed steps per round and side (default: 8)."),
    epoch_images: Optional[int] = typer.Option(None, "--epoch-images", help="lightning: images of the timed epoch per round and side (default: 256)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Alternating rounds (default: 3)."),
    parts: Optional[str] = typer.Option(None, "--parts", help="Comma-separated: lightning, pyro, mfu, malloc, compile (default: lightning, pyro, mfu)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads."),
    label: Optional[str] = typer.Option(None, "--label"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Results JSON."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Lightning's fit vs bare loop (whole epochs), Pyro vs plain-torch BNN, and model-FLOPs utilisation, side by side."""
    from cosmolit.bench.overhead import OverheadConfig, run_overhead_bench
    from cosmolit.bench.results import write_results

    _check_out(out, force)
    overrides = {"accelerator": accelerator, "batch_size": batch_size, "bnn_batch_size": bnn_batch_size,
                 "steps": steps, "epoch_images": epoch_images, "rounds": rounds, "threads": threads,
                 "parts": [p.strip() for p in parts.split(",") if p.strip()] if parts is not None else None}
    cfg = _section(config, "overhead", OverheadConfig, overrides)
    payload = run_overhead_bench(cfg, echo=typer.echo, label=label)
    write_results(out, payload, force=force)
    typer.echo(f"wrote {out}")


@command("plot", app_=bench_app)
def plot_cmd(
    results: List[Path] = typer.Argument(..., help="One or more results JSON files of the same kind."),
    reference: str = typer.Option("paper", "--reference", help="paper (draw the study's numbers) or none."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Series the ratios divide by (part of its legend)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="train results: cnn or bnn (default: the first)."),
    out: Path = typer.Option(..., "--out", "-o", help="Figure (.png, .pdf, .svg)."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Two-panel figure: time against batch size (or n images), and ratios between runs."""
    from cosmolit.bench.plot import plot_results

    path = plot_results(results, out, reference=reference, baseline=baseline, model=model, force=force)
    typer.echo(f"wrote {path}")
