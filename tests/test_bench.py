"""cosmolit.bench: timing callbacks, results schema, plots, static-graph fallback, CLI (tiny runs on CPU)."""

from __future__ import annotations

import copy
import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from cosmolit.backends.compiling import compile_refusal
from cosmolit.errors import UsageError


class ToyModule:
    """Factory of a tiny LightningModule with the interface cosmolit.bench expects."""

    @staticmethod
    def make(kind="cnn", loss=None):
        import pytorch_lightning as pl

        class Toy(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.save_hyperparameters({"targets": ["e1", "e2", "redshift"]})
                self.net = nn.Sequential(nn.Conv2d(6, 4, 3, stride=4), nn.Flatten(), nn.Linear(4 * 16 * 16, 3))

            def forward(self, x):  # (B, 6, 64, 64) -> (B, 3)
                return self.net(x / 100.0)

            def compute_loss(self, x, y):  # y (B, 3)
                return ((self(x) - y) ** 2).mean()

            def training_step(self, batch, batch_idx):
                return self.compute_loss(*batch)

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), lr=1e-3)

        torch.manual_seed(0)
        return Toy()


def toy_factory(kind, loss):
    return ToyModule.make(kind, loss)


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("values, median, iqr", [([1.0], 1.0, 0.0), ([1.0, 2.0, 3.0, 4.0, 5.0], 3.0, 2.0),
                                                 ([4.0, 1.0, 3.0, 2.0], 2.5, 1.5)])
def test_summarize(values, median, iqr):
    from cosmolit.bench.callbacks import summarize

    s = summarize(values)
    assert s["n"] == len(values)
    assert s["median"] == pytest.approx(median)
    assert s["iqr"] == pytest.approx(iqr)
    assert s["min"] == min(values) and s["max"] == max(values)
    assert summarize([])["n"] == 0 and math.isnan(summarize([])["median"])


def test_study_unit_and_reference_conversion():
    from cosmolit.bench import reference as ref
    from cosmolit.bench.callbacks import study_seconds

    # 100 epochs of 8,000 images at batch 2 = 400,000 steps
    assert study_seconds(0.001, 2) == pytest.approx(400.0)
    tf = ref.tf_cpu_train_seconds("cnn")
    assert tf[2] == pytest.approx(0.0167 * 400_000)
    assert ref.TRAIN["cnn"]["GC2 IPU (paper)"][12] == 151.53
    assert ref.TRAIN["bnn"]["V100 GPU (paper)"][24] == 522.48
    assert set(ref.GENERATE["V100 GPU (paper)"]) == {1, 10, 100, 500, 1000, 5000}
    assert "TF 2-core CPU (study code)" in ref.train_series("bnn")


def test_step_clock_excludes_warmup_and_divides_by_device_iterations():
    from cosmolit.bench.callbacks import StepClock

    clock = StepClock(warmup=2, steps_per_call=4)
    for _ in range(5):
        clock.start()
        sum(range(20000))
        clock.stop()
    assert clock.calls == 5 and len(clock.times) == 3
    single = StepClock()
    single.start()
    sum(range(20000))
    single.stop()
    assert all(t > 0 for t in clock.times)
    assert clock.summary()["median"] < single.times[0]  # /4 per call


def test_timing_callback_counts_steps_and_epochs():
    import pytorch_lightning as pl

    from cosmolit.bench.callbacks import TimingCallback

    model = ToyModule.make()
    x = torch.randn(24, 6, 64, 64).abs() * 50
    y = torch.randn(24, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)  # 6 steps/epoch
    timer = TimingCallback(warmup_steps=4, warmup_epochs=1)
    trainer = pl.Trainer(max_epochs=3, callbacks=[timer], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, loader)
    s = timer.summary()
    assert s["calls"] == 18 and s["step"]["n"] == 18 - 4
    assert s["epochs"] == 3 and s["epoch"]["n"] == 3 - 1
    assert s["step"]["min"] > 0 and s["epoch"]["min"] > s["step"]["min"]
    assert s["step"]["q1"] <= s["step"]["median"] <= s["step"]["q3"]


# ----------------------------------------------------------------------------- schema
def _train_payload(label="toy run", scale=1.0):
    from cosmolit.bench.callbacks import images_per_second, study_seconds, summarize
    from cosmolit.bench.results import make_payload

    rows = []
    for b in (2, 4, 8):
        st = summarize([0.01 * scale * (1 + b / 8), 0.011 * scale * (1 + b / 8)])
        rows.append({"model": "cnn", "batch_size": b, "mode": "lightning", "step_time": st,
                     "images_per_second": images_per_second(st["median"], b),
                     "seconds_per_100_epochs": study_seconds(st["median"], b)})
    return make_payload("train", rows, {"accelerator": "cpu"}, {"steps": 2}, label)


def test_results_round_trip(tmp_path):
    from cosmolit.bench.results import load_results, write_results

    payload = _train_payload()
    path = write_results(tmp_path / "r.json", payload)
    back = load_results(path)
    assert back == json.loads(json.dumps(payload))
    with pytest.raises(UsageError, match="already exists"):
        write_results(path, payload)
    write_results(path, payload, force=True)
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(schema="other/9"), "schema"),
    (lambda p: p.update(kind="inference"), "kind"),
    (lambda p: p.pop("environment"), "environment"),
    (lambda p: p.update(results=[]), "empty"),
    (lambda p: p["results"][0].pop("step_time"), "step_time"),
    (lambda p: p["results"][1].update(batch_size="four"), "batch_size"),
    (lambda p: p["results"][0]["step_time"].update(median=-1.0), "negative"),
    (lambda p: p["results"][0]["step_time"].update(n=0), "at least one"),
])
def test_malformed_results_are_refused(tmp_path, mutate, message):
    from cosmolit.bench.results import load_results

    payload = json.loads(json.dumps(_train_payload()))
    mutate(payload)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(UsageError, match=message) as err:
        load_results(path)
    assert "\n" not in str(err.value)


def test_not_json_and_missing_file(tmp_path):
    from cosmolit.bench.results import load_results

    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_results(bad)
    with pytest.raises(UsageError, match="does not exist"):
        load_results(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- plot
def test_plot_writes_png(tmp_path):
    from cosmolit.bench.plot import plot_results
    from cosmolit.bench.results import make_payload, write_results

    a = write_results(tmp_path / "a.json", _train_payload("run a"))
    b = write_results(tmp_path / "b.json", _train_payload("run b", scale=2.0))
    out = plot_results([a, b], tmp_path / "fig.png", reference="paper")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    gen_rows = [{"n": n, "time": {"n": 1, "median": 0.01 * n, "q1": 0.01 * n, "q3": 0.01 * n, "min": 0.01 * n,
                                  "max": 0.01 * n}, "images_per_second": 100.0} for n in (1, 10, 100)]
    g = write_results(tmp_path / "g.json", make_payload("generate", gen_rows, {}, {}, "gen"))
    out2 = plot_results([g], tmp_path / "gen.png", reference="paper", baseline="V100")
    assert out2.exists()
    with pytest.raises(UsageError, match="one kind"):
        plot_results([a, g], tmp_path / "mixed.png")
    with pytest.raises(UsageError, match="matches no series"):
        plot_results([a], tmp_path / "x.png", baseline="TPU")


def test_ratio():
    from cosmolit.bench.plot import ratio

    assert ratio({2: 4.0, 4: 2.0, 8: 1.0}, {2: 2.0, 8: 4.0}) == {2: 2.0, 8: 0.25}


# ----------------------------------------------------------------------------- static-graph mode
def test_static_train_step_falls_back_on_cpu():
    from cosmolit.backends.static import StaticCall, StaticTrainStep

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.PReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = lambda x, y: ((model(x) - y) ** 2).mean()  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(3, 16, 5, generator=gen), torch.randn(3, 16, 1, generator=gen)  # (K, B, ...)
    messages = []
    step = StaticTrainStep(model, loss_fn, opt, (xs, ys), echo=messages.append)
    assert not step.static and step.device_iterations == 3
    assert len(messages) == 1 and "no CUDA" in messages[0] and "eager" in messages[0]
    before = float(loss_fn(xs[0], ys[0]))
    for _ in range(20):
        step.run(xs, ys)
    assert float(loss_fn(xs[0], ys[0])) < before  # it trained: 60 Adam steps
    with pytest.raises(ValueError, match="differ"):
        step.run(xs[:2], ys[:2])
    # a loss_fn that reports parts: run returns each averaged over the K steps, detached
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (loading alone would share the moments)
    terms = lambda m: lambda x, y: {"loss": ((m(x) - y) ** 2).mean(), "mae": (m(x) - y).abs().mean()}  # noqa: E731
    out = StaticTrainStep(model, terms(model), opt, (xs, ys), echo=None).run(xs, ys)
    expected = {"loss": 0.0, "mae": 0.0}
    for k in range(3):
        twin_opt.zero_grad()
        t = terms(twin)(xs[k], ys[k])
        t["loss"].backward()
        twin_opt.step()
        expected = {name: expected[name] + float(t[name]) / 3 for name in expected}
    assert set(out) == {"loss", "mae"} and not out["loss"].requires_grad
    assert {name: float(v) for name, v in out.items()} == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    call = StaticCall(lambda a: a * 2, (torch.ones(3),), echo=messages.append)
    assert not call.static and torch.equal(call(torch.arange(3.0)), torch.tensor([0.0, 2.0, 4.0]))


def test_static_train_step_undoes_its_warm_up(monkeypatch):
    """What capture's warm-up steps change (weights, BatchNorm statistics, Adam moments, random state)
    is put back into the same tensors: the snapshot / restore pair, run here on CPU tensors."""
    from cosmolit.backends.static import StaticTrainStep

    rng = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: rng["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: rng.update(state=s))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs, ys = torch.randn(2, 16, 5), torch.randn(2, 16, 1)
    step = StaticTrainStep(model, lambda x, y: ((model(x) - y) ** 2).mean(), opt, (xs, ys), echo=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    addresses = [t.data_ptr() for t in model.state_dict().values()]
    snapshot = step._snapshot()
    step.run(xs, ys)  # two Adam steps: weights, running stats and moments move
    rng["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)
    assert not torch.equal(model.state_dict()["1.running_mean"], before["1.running_mean"])
    step._restore(snapshot)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [t.data_ptr() for t in after.values()] == addresses  # the same memory: a graph addresses it
    assert all(float(v.abs().sum()) == 0 for s in opt.state.values() for v in s.values())  # a fresh Adam state
    assert torch.equal(rng["state"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    # moments that existed before the snapshot come back to their values, not to zero
    step.run(xs, ys)
    moments = {id(p): s["exp_avg"].clone() for p, s in opt.state.items()}
    snapshot = step._snapshot()
    step.run(xs, ys)
    step._restore(snapshot)
    assert all(torch.equal(s["exp_avg"], moments[id(p)]) for p, s in opt.state.items())


def test_a_failed_capture_names_the_error_of_the_captured_code():
    from cosmolit.backends.static import capture_failure

    try:
        try:
            raise RuntimeError("Cannot call CUDAGeneratorImpl::current_seed during CUDA graph capture\nmore")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")
    except RuntimeError as exc:
        ending = exc
    assert capture_failure(ending) == ("CUDA graph capture failed (RuntimeError: Cannot call "
                                       "CUDAGeneratorImpl::current_seed during CUDA graph capture)")
    assert capture_failure(ValueError("")) == "CUDA graph capture failed (ValueError: ValueError)"


def test_bench_train_modes_with_toy_model():
    from cosmolit.bench.results import validate
    from cosmolit.bench.train import TrainBenchConfig, run_train_bench

    msgs = []
    for mode in ("lightning", "bare", "static"):
        cfg = TrainBenchConfig(batch_sizes=[2, 4], steps=4, warmup_steps=2, mode=mode, pool=8, threads=1,
                               device_iterations=2 if mode == "static" else 1)
        payload = run_train_bench(cfg, echo=msgs.append, progress=False, factory=toy_factory)
        validate(payload)
        rows = payload["results"]
        assert [r["batch_size"] for r in rows] == [2, 4]
        assert all(r["step_time"]["median"] > 0 for r in rows)
        if mode != "static":
            assert all(r["steps_timed"] == 4 for r in rows)
        else:
            assert rows[0]["static"] is False and rows[0]["device_iterations"] == 2
        r = rows[0]
        assert r["seconds_per_100_epochs"] == pytest.approx(r["step_time"]["median"] * 8000 / 2 * 100)
        assert payload["environment"]["mode"] == mode and "hostname" not in payload["environment"]
    assert any("needs CUDA" in m for m in msgs)


def test_bench_train_lightning_in_static_graph_mode_times_fits_step_per_optimizer_step():
    """lightning mode with static_graph: `cosmolit fit`'s step on a GPU; on a CPU its eager fallback."""
    from cosmolit.bench.results import validate
    from cosmolit.bench.train import TrainBenchConfig, run_train_bench

    with pytest.raises(ValueError, match="static_graph applies to mode lightning"):
        TrainBenchConfig(mode="bare", static_graph=True)
    msgs = []
    cfg = TrainBenchConfig(batch_sizes=[2], steps=3, warmup_steps=1, pool=8, threads=1, static_graph=True,
                           device_iterations=2, stamp=16, bands="gri")
    payload = run_train_bench(cfg, echo=msgs.append, progress=False)
    validate(payload)
    row = payload["results"][0]
    assert row["device_iterations"] == 2 and row["steps_timed"] == 3  # 3 timed calls of 2 optimizer steps
    assert row["static"] is False and row["static_reason"] == "no CUDA device"
    assert "epoch_time" not in row  # the one epoch of a --steps run is cut short
    assert any("static-graph mode unavailable" in m for m in msgs)


def test_bench_generate_with_toy_decoder():
    from cosmolit.bench.generate import GenerateBenchConfig, run_generate_bench

    class ToyVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.Linear(4, 6 * 8 * 8)

        def sample(self, n):
            return self.dec(torch.randn(n, 4)).reshape(n, 6, 8, 8)

    cfg = GenerateBenchConfig(n=[1, 50], repeats=2, warmup=5)
    payload = run_generate_bench(cfg, echo=lambda m: None, progress=False, factory=ToyVAE)
    assert [r["n"] for r in payload["results"]] == [1, 50]
    assert all(r["time"]["n"] == 2 and r["time"]["min"] > 0 for r in payload["results"])
    assert not any("decode_time" in r for r in payload["results"])  # no latent flow: nothing to split


# ----------------------------------------------------------------------------- FLOPs
def test_forward_flops_of_the_study_trunk():
    from cosmolit.bench.overhead import count_forward_flops

    layers, c = [], 6
    for f in (32, 64, 128, 256):  # the study's trunk: conv 3x3 same, conv 3x3 stride 2, each + PReLU
        layers += [nn.Conv2d(c, f, 3, padding=1), nn.PReLU(), nn.Conv2d(f, f, 3, stride=2, padding=1), nn.PReLU()]
        c = f
    trunk = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 4 * 256, 9))
    flops = count_forward_flops(trunk, torch.zeros(1, 6, 64, 64))
    first = 2 * 32 * 64 * 64 * 6 * 9
    assert flops > first
    assert flops == pytest.approx(0.2e9, rel=0.05)  # the paper's "about 0.2 GFLOP per image"
    assert count_forward_flops(nn.Linear(10, 7), torch.zeros(3, 10)) == 2 * 3 * 7 * 10
    assert count_forward_flops(nn.ConvTranspose2d(4, 2, 2, stride=2), torch.zeros(1, 4, 5, 5)) == 2 * 100 * 2 * 4


def test_overhead_lightning_and_mfu_with_toy(tmp_path):
    from cosmolit.bench.overhead import OverheadConfig, run_overhead_bench
    from cosmolit.bench.results import load_results, write_results

    cfg = OverheadConfig(batch_size=4, steps=3, warmup_steps=1, rounds=2, parts=["lightning", "mfu"],
                         matmul_size=128, threads=1, epoch_images=8)
    payload = run_overhead_bench(cfg, echo=lambda m: None, factories={"cnn": toy_factory})
    names = {r["name"]: r for r in payload["results"]}
    ratio = names["lightning_epoch_over_bare_cnn_b4"]
    assert ratio["value"] == pytest.approx(float(np.median(ratio["round_ratios"])))
    assert ratio["a"]["n"] == 2 and ratio["a_steps"] == ratio["b_steps"] == [2 * (8 // 4)] * 2
    assert 0 < names["mfu_cnn_b4"]["value"]
    assert names["cnn_forward_gflop_per_image"]["value"] == pytest.approx(2 * 4 * 16 * 16 * 6 * 9 / 1e9
                                                                         + 2 * 3 * 1024 / 1e9)
    load_results(write_results(tmp_path / "o.json", payload))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_overhead_malloc_times_both_sides_in_fresh_processes():
    from cosmolit.bench.overhead import OverheadConfig, run_overhead_bench

    cfg = OverheadConfig(batch_size=2, steps=2, warmup_steps=1, rounds=2, parts=["malloc"], threads=1)
    payload = run_overhead_bench(cfg, echo=lambda m: None)
    (row,) = payload["results"]
    assert row["name"] == "malloc_system_over_retain_cnn_b2"
    assert row["value"] == pytest.approx(row["a"]["median"] / row["b"]["median"])
    assert row["a"]["n"] == row["b"]["n"] == 2 * 2 and row["a"]["min"] > 0 and row["b"]["min"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
@pytest.mark.parametrize("extra, env, expected", [((), {}, "retain"), (("--system-malloc",), {}, "system"),
                                                  ((), {"COSMOLIT_SYSTEM_MALLOC": "1"}, "system")])
def test_cli_malloc_setting_reaches_the_results(tmp_path, extra, env, expected):
    import os
    import subprocess

    out = tmp_path / "g.json"
    cmd = [sys.executable, "-m", "cosmolit", *extra, "bench", "generate", "--n", "1", "--repeats", "1",
           "--warmup", "0", "--threads", "1", "--out", str(out), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["environment"]["malloc"] == expected


# ----------------------------------------------------------------------------- CLI
def _cli():
    from typer.testing import CliRunner

    from cosmolit.cli import app

    return CliRunner(), app


def test_cli_bench_usage_errors(tmp_path):
    runner, app = _cli()
    res = runner.invoke(app, ["bench", "train", "--mode", "turbo", "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "mode" in res.output and "lightning" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["bench", "train", "--batch-sizes", "2,x", "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "--batch-sizes" in res.output
    res = runner.invoke(app, ["bench", "train", "--model", "bnn", "--loss", "mse", "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "mse" in res.output
    (tmp_path / "bad.json").write_text("[]")
    res = runner.invoke(app, ["bench", "plot", str(tmp_path / "bad.json"), "--out", str(tmp_path / "f.png")])
    assert res.exit_code == 2 and "JSON object" in res.output
    assert not (tmp_path / "r.json").exists()


def test_cli_bench_help_shows_the_defaults():
    """Rich would read "[default: ...]" in a help text as a style tag and print nothing of it."""
    runner, app = _cli()
    res = runner.invoke(app, ["bench", "train", "--help"], env={"COLUMNS": "250"}, terminal_width=250)
    assert res.exit_code == 0
    assert "(default: 2,4,8,14)" in res.output and "(default: lightning)" in res.output


def test_cli_bench_plot(tmp_path):
    from cosmolit.bench.results import write_results

    runner, app = _cli()
    a = write_results(tmp_path / "a.json", _train_payload())
    res = runner.invoke(app, ["bench", "plot", str(a), "--reference", "paper", "--out", str(tmp_path / "f.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f.png").stat().st_size > 10_000


@pytest.mark.parametrize("model", ["cnn", "bnn"])
def test_cli_bench_train_tiny_real_model(tmp_path, model):
    from cosmolit.bench.results import load_results

    runner, app = _cli()
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["bench", "train", "--model", model, "--batch-sizes", "2", "--steps", "3",
                              "--warmup-steps", "1", "--threads", "1", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    payload = load_results(out)
    row = payload["results"][0]
    assert row["model"] == model and row["batch_size"] == 2 and row["steps_timed"] == 3
    assert row["step_time"]["median"] > 0 and np.isfinite(row["images_per_second"])
    assert payload["environment"]["torch"] == torch.__version__


def test_cli_bench_generate_and_overhead_real_models(tmp_path):
    from cosmolit.bench.results import load_results

    runner, app = _cli()
    gen = tmp_path / "g.json"
    res = runner.invoke(app, ["bench", "generate", "--n", "1,3", "--repeats", "2", "--warmup", "2", "--threads", "1",
                              "--out", str(gen), "-q"])
    assert res.exit_code == 0, res.output
    rows = load_results(gen)["results"]
    assert [r["n"] for r in rows] == [1, 3] and all(r["time"]["n"] == 2 for r in rows)
    assert all(r["decode_time"]["n"] == 2 and r["decode_time"]["min"] > 0 for r in rows)  # the decoder alone
    ovh = tmp_path / "o.json"
    res = runner.invoke(app, ["bench", "overhead", "--batch-size", "2", "--bnn-batch-size", "2", "--steps", "1",
                              "--rounds", "1", "--parts", "pyro,mfu,compile", "--threads", "1", "--out", str(ovh)])
    assert res.exit_code == 0, res.output
    names = {r["name"]: r for r in load_results(ovh)["results"]}
    assert names["cnn_forward_gflop_per_image"]["value"] == pytest.approx(0.2, rel=0.05)
    assert names["pyro_over_torch_bnn_b2"]["value"] > 0 and names["mfu_cnn_b2"]["value"] > 0
    for kind in ("cnn", "bnn"):  # eager against compile_network, side by side
        row = names[f"eager_over_compiled_{kind}_b2"]
        assert row["value"] == pytest.approx(row["a"]["median"] / row["b"]["median"]) and row["b"]["n"] == 1
        assert any(f"compile {s}" in row["note"] for s in (("unavailable",) if compile_refusal() else ("on", "failed")))


def test_bench_vs_tf_alternates_both_sides_and_divides_per_round(tmp_path, capsys):
    """benchmarks/bench_vs_tf.py with a stand-in for the TF environment (its own python writing 50 ms
    per step): the real cosmolit CNN is timed by whole epochs, and each ratio is TF / cosmolit."""
    import importlib.util
    import os
    import statistics
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_vs_tf", root / "benchmarks" / "bench_vs_tf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fake = tmp_path / "tf-python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "a = sys.argv[2:]\n"
        "get = lambda k: a[a.index(k) + 1]\n"
        "if get('--model') == 'decoder':\n"
        "    rows = [{'n': int(n), 'decode_s': 2.0} for n in get('--n').split(',')]\n"
        "else:\n"
        "    rows = [{'batch_size': int(b), 'step_s': 0.05, 'batch_s_median': 0.04} for b in get('--batch-sizes').split(',')]\n"
        "json.dump({'results': rows, 'environment': {'tensorflow': 'stand-in'}}, open(get('--out'), 'w'))\n")
    os.chmod(fake, 0o755)
    out = tmp_path / "vs.json"
    assert mod.main(["--tf-python", str(fake), "--models", "cnn,decoder", "--cnn-batch-sizes", "2", "--rounds", "2",
                     "--epochs", "1", "--epoch-images", "4", "--decoder-n", "3", "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    row, dec = doc["table"]
    assert dec["model"] == "decoder" and dec["size"] == 3 and dec["tf_ms"] == pytest.approx(2000.0)
    assert dec["tf_over_eager"] == pytest.approx(statistics.median(2000.0 / t for t in dec["eager_ms_rounds"]))
    assert row["model"] == "cnn" and row["size"] == 2 and row["tf_ms"] == pytest.approx(50.0)
    assert len(row["eager_ms_rounds"]) == 2 and all(t > 0 for t in row["eager_ms_rounds"])
    ratios = [50.0 / t for t in row["eager_ms_rounds"]]
    assert row["tf_over_eager"] == pytest.approx(statistics.median(ratios))  # median of the per-round ratios
    assert doc["environment"]["tf"] == {"tensorflow": "stand-in"}
    assert "| cnn | 2 | 50.0 |" in capsys.readouterr().out
    assert "compiled_ms" not in row  # only with --compile
    with pytest.raises(SystemExit) as e:
        mod.main(["--tf-python", str(tmp_path / "missing"), "--out", str(out)])
    assert e.value.code == 2
