"""All GPU benchmarks of cosmolit in one process: training (lightning, static), generation, overheads.

    python benchmarks/gpu/run_gpu_bench.py --out OUT [--quick] [--budget 450]

Writes into OUT: train_cnn_<mode>.json, train_bnn_<mode>.json (static: the bare loop in a CUDA graph;
lightning_static: `cosmolit fit`'s default step on a GPU; lightning: Lightning's eager step; ...),
generate_<mode>.json, overhead.json (schema cosmolit-bench/1), the comparison figures train_cnn.png, train_bnn.png,
generate.png (beside the study's V100 / GC2 numbers), summary.md (goals on one H200), and
errors.txt when a part failed (the other parts still run). Parts are run cheapest-first and
skipped once the time budget is spent, so the run always ends with figures.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

CNN_BATCHES = [2, 4, 8, 10, 12, 14, 16, 24]
BNN_BATCHES = [2, 4, 6, 8, 12, 16, 24]
GEN_N = [1, 10, 100, 500, 1000, 5000]


def main(argv=None) -> int:
    from cosmolit.backends.memory import retain_freed_memory

    retain_freed_memory()  # host memory as the cosmolit command sets it
    p = argparse.ArgumentParser(description="cosmolit GPU benchmarks")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="few steps and batch sizes (smoke run)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds; later parts are skipped past it")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device-iterations", type=int, default=8, help="static mode: steps per graph replay")
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    errors: list[str] = []
    done: dict[str, Path] = {}

    import torch

    if not torch.cuda.is_available():
        print("run_gpu_bench: error: no CUDA device is visible", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    from cosmolit.bench.generate import GenerateBenchConfig, run_generate_bench
    from cosmolit.bench.overhead import OverheadConfig, run_overhead_bench
    from cosmolit.bench.results import write_results
    from cosmolit.bench.train import TrainBenchConfig, run_train_bench

    steps = args.steps or (5 if args.quick else 40)
    cnn_b = [2, 8] if args.quick else CNN_BATCHES
    bnn_b = [2, 8] if args.quick else BNN_BATCHES

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    def part(name: str, fn, min_left: float = 20.0):
        if left() < min_left:
            errors.append(f"{name}: skipped, time budget spent")
            print(f"[{time.perf_counter() - t_start:6.1f}s] skip {name} (budget)", flush=True)
            return
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name}", flush=True)
        try:
            payload = fn()
            path = write_results(out / f"{name}.json", payload, force=True)
            done[name] = path
        except Exception as exc:  # keep going: one failed part must not lose the others
            errors.append(f"{name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)

    def train(model, mode, batches, k=1, compile_=False, static_graph=False):
        cfg = TrainBenchConfig(model=model, accelerator="gpu", batch_sizes=batches, steps=steps,
                               warmup_steps=5, mode=mode, device_iterations=k, static_graph=static_graph,
                               loss="mse" if model == "cnn" else None, pool=256, compile=compile_)
        label = (f"cosmolit {torch.cuda.get_device_name(0)} {mode}" + (" static graph" if static_graph else "")
                 + (f" K={k}" if k > 1 else "") + (" compiled" if compile_ else ""))
        return run_train_bench(cfg, progress=False, label=label)

    part("train_cnn_static", lambda: train("cnn", "static", cnn_b, args.device_iterations))
    # `cosmolit fit`'s step on one GPU (static_graph: auto), K optimizer steps per Lightning step
    part("train_cnn_lightning_static", lambda: train("cnn", "lightning", cnn_b, args.device_iterations,
                                                     static_graph=True))
    part("generate_static", lambda: run_generate_bench(
        GenerateBenchConfig(accelerator="gpu", n=GEN_N if not args.quick else [1, 1000], repeats=5, mode="static"),
        progress=False, label="cosmolit GPU static"))
    part("generate_eager", lambda: run_generate_bench(
        GenerateBenchConfig(accelerator="gpu", n=GEN_N if not args.quick else [1, 1000], repeats=5, mode="eager"),
        progress=False, label="cosmolit GPU eager"))
    part("train_bnn_static", lambda: train("bnn", "static", bnn_b, args.device_iterations))
    part("train_bnn_lightning_static", lambda: train("bnn", "lightning", bnn_b, args.device_iterations,
                                                     static_graph=True))
    part("train_cnn_lightning", lambda: train("cnn", "lightning", cnn_b))
    part("train_bnn_lightning", lambda: train("bnn", "lightning", bnn_b))
    part("train_cnn_static_k1", lambda: train("cnn", "static", [2, 12] if not args.quick else [2], 1))
    part("train_cnn_bare", lambda: train("cnn", "bare", [2, 12] if not args.quick else [2]))
    # fit's trainer.compile on the GPU (inductor / Triton): the Lightning step with the network compiled
    part("train_cnn_lightning_compile", lambda: train("cnn", "lightning", [2, 12] if not args.quick else [2],
                                                      compile_=True), min_left=90.0)
    part("overhead", lambda: run_overhead_bench(
        OverheadConfig(accelerator="gpu", batch_size=32, bnn_batch_size=32, steps=10 if not args.quick else 3,
                       rounds=3 if not args.quick else 2, matmul_size=8192)))

    from cosmolit.bench.plot import plot_results

    for fig, names in (("train_cnn", ["train_cnn_static", "train_cnn_lightning_static", "train_cnn_lightning",
                                      "train_cnn_static_k1", "train_cnn_bare", "train_cnn_lightning_compile"]),
                       ("train_bnn", ["train_bnn_static", "train_bnn_lightning_static", "train_bnn_lightning"]),
                       ("generate", ["generate_static", "generate_eager"])):
        files = [done[n] for n in names if n in done]
        if files:
            try:
                plot_results(files, out / f"{fig}.png", reference="paper", baseline="GC2 IPU", force=True)
            except Exception as exc:
                errors.append(f"plot {fig}: {type(exc).__name__}: {exc}")
    _summary(out, done)
    if errors:
        (out / "errors.txt").write_text("\n\n".join(errors))
    print(f"done in {time.perf_counter() - t_start:.0f} s; {len(done)} result files, {len(errors)} problems")
    return 0 if not errors else 1


def _summary(out: Path, done: dict) -> None:
    """summary.md: best time per goal of issue 5 (one H200), from the files written."""
    from cosmolit.bench.reference import H200_GOALS
    from cosmolit.bench.results import load_results

    best: dict = {}
    lines = ["| run | x | cosmolit (s) | goal (s) | met |", "|---|---|---|---|---|"]
    for name, path in done.items():
        payload = load_results(path)
        for row in payload["results"]:
            if payload["kind"] == "train":
                key, value = (row["model"], row["batch_size"]), row["seconds_per_100_epochs"]
            elif payload["kind"] == "generate":
                key, value = ("generate", row["n"]), row["time"]["median"]
            else:
                continue
            if key in H200_GOALS and (key not in best or value < best[key][0]):
                best[key] = (value, name)
    for key, goal in H200_GOALS.items():
        if key in best:
            value, name = best[key]
            lines.append(f"| {key[0]} ({name}) | {key[1]} | {value:.3f} | {goal} | {'yes' if value < goal else 'no'} |")
        else:
            lines.append(f"| {key[0]} | {key[1]} | not measured | {goal} | - |")
    (out / "summary.md").write_text("Goals of issue 5 on one GPU (train: s per 100 epochs of 8,000; "
                                    "generate: s)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
