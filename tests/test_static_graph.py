"""Static-graph training in `cosmolit fit` (trainer.static_graph, trainer.device_iterations).

On a GPU each Lightning step replays one CUDA graph of K optimizer steps (cosmolit.backends.static).
A CPU has no CUDA graphs: there the same code path runs the K steps eager, after one line saying
so, and these tests pin its arithmetic (the same weights as Lightning's own steps), its step
counting and its refusals. Whether capture works on a GPU is measured by benchmarks/gpu.
"""

from __future__ import annotations

import csv

import pytest
import torch
from typer.testing import CliRunner

from cosmolit.checkpoint import read_checkpoint
from cosmolit.cli import app
from cosmolit.errors import UsageError

# constant rate: static-graph mode takes no schedule (the VAE's default is cosine)
CONFIG = "model: {filters: [4, 8], lr_schedule: constant}\ndata: {val_fraction: 0.25}\ntrainer: {log_every_n_steps: 1}\n"
FALLBACK = "static-graph mode unavailable: no CUDA device; running eager steps instead"


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(CONFIG)
    return path


def _fit(data, out, config, *extra, model="cnn"):
    return CliRunner().invoke(app, ["fit", "--model", model, "--data", str(data), "--out", str(out), "--config",
                                    str(config), "--epochs", "2", "--batch-size", "4", "--accelerator", "cpu",
                                    "--seed", "7", "-q", *extra])


def _val_losses(run):
    with open(run / "logs" / "metrics.csv") as fh:
        return [float(r["val_loss"]) for r in csv.DictReader(fh) if r.get("val_loss")]


@pytest.mark.parametrize("model", ["cnn", "bnn", "vae"])
def test_static_graph_steps_train_the_same_weights_as_lightning_steps(tmp_path, config, synthetic_small_h5, model):
    # 36 training stamps: 9 batches of 4 per epoch, or 3 Lightning steps of K = 3 batches each
    plain = _fit(synthetic_small_h5, tmp_path / "plain", config, model=model)
    assert plain.exit_code == 0, plain.output
    assert "static-graph mode" not in plain.output  # auto is off on a CPU
    static = _fit(synthetic_small_h5, tmp_path / "static", config, "--static-graph", "--device-iterations", "3",
                  model=model)
    assert static.exit_code == 0, static.output
    assert FALLBACK in static.output
    a = read_checkpoint(tmp_path / "plain" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(tmp_path / "static" / "checkpoints" / "last.ckpt")
    assert list(a["state_dict"]) == list(b["state_dict"])
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    # Lightning counts one step per host call (K optimizer steps), as on an IPU
    assert (a["global_step"], b["global_step"]) == (18, 6)
    assert _val_losses(tmp_path / "static") == _val_losses(tmp_path / "plain")
    assert len(_val_losses(tmp_path / "plain")) == 2


@pytest.mark.parametrize("extra, config_text, message", [
    (["--device-iterations", "2"], CONFIG, "device_iterations 2 needs an IPU or static-graph mode"),
    (["--static-graph", "--precision", "bf16-mixed"], CONFIG,
     "static_graph: true does not go with precision bf16-mixed (32-true only)"),
    (["--static-graph"], "model: {filters: [4, 8], lr_schedule: cosine}\n",
     "static_graph: true does not go with lr_schedule cosine (constant only)"),
    ([], "trainer: {static_graph: sometimes}\n", "static_graph must be true, false or auto"),
    (["--static-graph", "--device-iterations", "10"], CONFIG, "fewer than the 40 (10 x 4) one training step takes"),
    (["--device-iterations", "0"], CONFIG, "--device-iterations"),
])
def test_static_graph_refusals_are_one_line_and_write_nothing(tmp_path, synthetic_small_h5, extra, config_text,
                                                              message):
    path = tmp_path / "c.yaml"
    path.write_text(config_text)
    out = tmp_path / "run"
    res = _fit(synthetic_small_h5, out, path, *extra)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_static_graph_auto_is_on_for_one_gpu_at_32_bit_with_a_constant_learning_rate():
    from cosmolit.train import FitConfig, TrainerConfig, _static_graph_steps

    said = []
    steps = lambda accel, lr="constant", **t: _static_graph_steps(FitConfig(trainer=TrainerConfig(**t)),  # noqa: E731
                                                                  accel, lr, said.append)
    assert steps("gpu") == 1 and steps("gpu", device_iterations=8) == 8
    assert steps("cpu") == 0 and steps("ipu") == 0 and steps("ipu", device_iterations=4) == 0
    assert steps("cpu", static_graph=True, device_iterations=2) == 2
    assert steps("gpu", static_graph=False) == 0 and not said
    assert steps("gpu", devices=2) == 0
    assert steps("gpu", precision="16-mixed") == 0
    assert steps("gpu", lr="cosine") == 0
    assert said == ["static_graph: auto is off here: devices 2 (one GPU only)",
                    "static_graph: auto is off here: precision 16-mixed (32-true only)",
                    "static_graph: auto is off here: lr_schedule cosine (constant only)"]
    with pytest.raises(UsageError, match="device_iterations 8 needs an IPU"):
        steps("gpu", devices=2, device_iterations=8)
    with pytest.raises(UsageError, match="on an IPU PopTorch runs every step"):
        steps("ipu", static_graph=True)


def test_a_module_in_static_graph_mode_refuses_a_batch_that_does_not_split(synthetic_small_h5):
    from cosmolit.models.cnn import ShapeCNN

    model = ShapeCNN(filters=[4, 8], bands="gri", stamp=32)
    with pytest.raises(UsageError, match="device_iterations must be a positive integer"):
        model.enable_static_graph(0)
    model.enable_static_graph(3, echo=None)
    assert not model.automatic_optimization and model.static_graph_status() == ("pending", None)
    with pytest.raises(UsageError, match="a training batch of 8 stamps does not split into device_iterations=3"):
        model.training_step((torch.zeros(8, 3, 32, 32), torch.zeros(8, 3)), 0)
    model.disable_static_graph()
    assert model.automatic_optimization and model.static_graph_status() == ("off", None)


def test_checkpoints_of_a_captured_run_resume_on_a_cpu():
    """Static-graph mode makes Adam capturable; torch's per-tensor Adam refuses that flag on a CPU.
    The checkpoint keeps the plain flag, so its optimizer state steps on a CPU too."""
    from cosmolit.backends.static import make_capturable
    from cosmolit.models.cnn import ShapeCNN

    model = ShapeCNN(filters=[4, 8], bands="gri", stamp=32)

    def adam():
        return torch.optim.Adam(model.parameters(), lr=1e-3)  # per-tensor form (the pinned stack's on a CPU)

    def step(opt):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()

    opt = adam()
    step(opt)
    make_capturable(opt)
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    model.on_save_checkpoint(checkpoint)
    assert opt.param_groups[0]["capturable"]  # the live optimizer is untouched
    with pytest.raises(AssertionError, match="capturable"):
        step(opt)
    fresh = adam()
    fresh.load_state_dict(checkpoint["optimizer_states"][0])
    assert fresh.param_groups[0]["capturable"] is False
    step(fresh)
