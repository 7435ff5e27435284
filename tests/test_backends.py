"""Accelerator selection, IPU options and the one-line errors for a missing IPU stack (both venvs)."""

from __future__ import annotations

import sys

import pytest
import torch

from cosmolit import backends
from cosmolit.backends import IPUOptions, is_ipu_stack, resolve_accelerator, trainer_kwargs
from cosmolit.config import from_dict
from cosmolit.errors import UsageError


def test_resolve_accelerator_names():
    assert resolve_accelerator("cpu") == "cpu"
    assert resolve_accelerator("ipu") == "ipu"
    expected = "gpu" if torch.cuda.is_available() else "cpu"
    assert resolve_accelerator("auto") == expected
    with pytest.raises(UsageError, match="auto, cpu, gpu, ipu") as exc:
        resolve_accelerator("tpu")
    assert "'tpu'" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_without_cuda_is_a_usage_error():
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_accelerator("gpu")


def test_auto_prefers_ipu_only_with_hardware(monkeypatch):
    monkeypatch.setattr(backends.select, "_ipu_hardware", lambda: True)
    assert resolve_accelerator("auto") == "ipu"
    monkeypatch.setattr(backends.select, "_ipu_hardware", lambda: False)
    assert resolve_accelerator("auto") in ("cpu", "gpu")


def test_cpu_trainer_kwargs_and_echo():
    lines = []
    kw = trainer_kwargs("cpu", 1, "32-true", 0, echo=lines.append)
    assert kw == {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"}
    assert lines == ["accelerator: cpu, precision 32-true"]
    with pytest.raises(UsageError, match="16-mixed.*not supported on cpu"):
        trainer_kwargs("cpu", 1, "16-mixed", 0, echo=lines.append)
    assert trainer_kwargs("cpu", 2, "32-true", 0, echo=lines.append)["strategy"] == "ddp"  # over gloo


def test_multi_gpu_uses_ddp(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    lines = []
    kw = trainer_kwargs("gpu", 4, "16-mixed", 0, echo=lines.append)
    assert kw["strategy"] == "ddp" and kw["devices"] == 4 and kw["accelerator"] == "gpu"
    assert "DDP" in lines[0]
    assert trainer_kwargs("gpu", 1, "32-true", 0, echo=lines.append)["strategy"] == "auto"
    with pytest.raises(UsageError, match="only 4 CUDA"):
        trainer_kwargs("gpu", 8, "32-true", 0, echo=lines.append)


def test_ipu_options_strict_config():
    opts = from_dict(IPUOptions, {"device_iterations": 4, "replication_factor": 2, "gradient_accumulation": 3,
                                  "precision": "16-mixed", "seed": 5}, "config.ipu")
    assert opts.samples_per_step_factor == 24
    with pytest.raises(UsageError, match="unknown key 'device_iteration'"):
        from_dict(IPUOptions, {"device_iteration": 4}, "config.ipu")
    with pytest.raises(UsageError, match="device_iterations must be a positive integer"):
        from_dict(IPUOptions, {"device_iterations": 0}, "config.ipu")
    with pytest.raises(UsageError, match="not allowed on IPU"):
        from_dict(IPUOptions, {"precision": "bf16-mixed"}, "config.ipu")
    with pytest.raises(UsageError, match="available_memory_proportion"):
        from_dict(IPUOptions, {"available_memory_proportion": 1.5}, "config.ipu")


@pytest.mark.skipif(is_ipu_stack(), reason="the pinned IPU stack is installed here")
def test_ipu_on_new_lightning_names_the_pinned_stack():
    with pytest.raises(UsageError) as exc:
        trainer_kwargs("ipu", 1, "32-true", 0, echo=lambda s: None)
    msg = str(exc.value)
    assert "pytorch-lightning 2.0.9" in msg and "torch 2.0.1" in msg and "constraints/ipu.txt" in msg
    assert "removed IPU support in 2.1" in msg and "\n" not in msg


@pytest.mark.skipif(not is_ipu_stack(), reason="needs pytorch-lightning 2.0.x")
def test_ipu_without_poptorch_says_what_to_install(monkeypatch):
    monkeypatch.setattr(backends.ipu_options, "poptorch_available", lambda: False)
    with pytest.raises(UsageError) as exc:
        trainer_kwargs("ipu", 1, "32-true", 0, echo=lambda s: None)
    msg = str(exc.value)
    assert "poptorch is not installed" in msg and "Poplar SDK 3.3 or 3.4" in msg and "enable.sh" in msg
    assert "\n" not in msg


def test_broken_poptorch_import_is_one_line(monkeypatch, tmp_path):
    pkg = tmp_path / "poptorch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise AssertionError('This version of PopTorch only works with torch==2.0.1')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "poptorch", raising=False)
    with pytest.raises(UsageError, match=r"poptorch failed to import \(This version of PopTorch only works"):
        backends.select.import_poptorch()
    monkeypatch.delitem(sys.modules, "poptorch", raising=False)


def test_cli_fit_ipu_error_is_one_line(synthetic_small_h5, tmp_path):
    """Through `cosmolit fit`: a missing IPU stack is exit 2 with one line, not a traceback."""
    from typer.testing import CliRunner

    from cosmolit.cli import app

    if is_ipu_stack():
        pytest.skip("covered with the test double in test_ipu_stack.py")
    result = CliRunner().invoke(app, ["fit", "--model", "cnn", "--data", str(synthetic_small_h5), "--accelerator",
                                      "ipu", "--epochs", "1", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2
    assert "pytorch-lightning 2.0.9" in result.output and "Traceback" not in result.output


def _bench_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ipu" / "run_ipu_bench.py"
    spec = importlib.util.spec_from_file_location("run_ipu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ipu_bench_script_dry_run(capsys):
    bench = _bench_script()
    assert bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    # the study's grid: CNN batch 2..14, BNN batch 2..8, generation 1..5000 images
    assert "train cnn batch 14" in out and "train bnn batch 8" in out and "generate 5000 images" in out
    assert "train bnn batch 10" not in out
    assert bench.main(["--dry-run", "--models", "vit"]) == 2
    assert "unknown 'vit'" in capsys.readouterr().err
    assert bench.main(["--dry-run", "--epochs", "1"]) == 2


def test_make_adam_is_fused_off_the_ipu_where_torch_has_it_and_plain_on_the_ipu(monkeypatch):
    import torch

    import cosmolit.backends as backends

    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = backends.make_adam(params, 0.01)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 0.01
    try:
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True)
        has_fused = True
    except RuntimeError:
        has_fused = False
    assert bool(opt.defaults.get("fused")) is has_fused
    monkeypatch.setattr(backends, "on_ipu", lambda module: True)
    assert not backends.make_adam(params, 0.01, module=object()).defaults.get("fused")
    # same mathematics: one step of each from the same gradients lands on the same values
    a = [p.detach().clone().requires_grad_(True) for p in params]
    b = [p.detach().clone().requires_grad_(True) for p in params]
    for group, opt in ((a, backends.make_adam(a, 0.01)), (b, torch.optim.Adam(b, lr=0.01))):
        for p in group:
            p.grad = torch.ones_like(p)
        opt.step()
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


def test_cosmolit_adam_steps_channels_last_weights_like_torch_and_hands_its_kernel_contiguous_views(monkeypatch):
    import torch

    from cosmolit.backends.adam import Adam, memory_order_view

    try:
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True)
    except RuntimeError:
        pytest.skip("no fused CPU Adam in this torch: make_adam uses the plain form")
    cl = torch.channels_last
    torch.manual_seed(0)
    shapes = [(8, 6, 3, 3), (8,), (4, 8, 3, 3)]
    start = [torch.randn(s) for s in shapes]
    plain = [torch.nn.Parameter(w.clone()) for w in start]
    dense = [torch.nn.Parameter(w.clone().contiguous(memory_format=cl) if w.dim() == 4 else w.clone())
             for w in start]
    seen = []  # (contiguous?) of every tensor the fused kernel receives from Adam
    kernel = torch._fused_adam_

    def spy(*tensor_lists, **kwargs):
        seen.extend(t.is_contiguous() for lst in tensor_lists[:4] for t in lst)
        return kernel(*tensor_lists, **kwargs)

    reference = torch.optim.Adam(plain, lr=0.01, fused=True)
    opt = Adam(dense, lr=0.01, fused=True)
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(plain, dense, grads):
            p.grad, q.grad = g.clone(), g.clone().contiguous(memory_format=cl) if g.dim() == 4 else g.clone()
        reference.step()
        monkeypatch.setattr(torch, "_fused_adam_", spy)
        opt.step()
        monkeypatch.setattr(torch, "_fused_adam_", kernel)
    assert seen and all(seen)
    for p, q in zip(plain, dense):  # bit for bit, and the weights keep their layout
        assert torch.equal(p, q) and torch.equal(reference.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])
    assert not dense[0].is_contiguous() and dense[0].is_contiguous(memory_format=cl)
    # torch's fused kernel pairs elements by memory position: a gradient or moments in another
    # layout than their weight must be brought to it first, or the update is silently wrong
    q, g = dense[0], torch.randn(shapes[0])
    plain[0].grad, q.grad = g.clone(), g.clone()  # contiguous gradient, channels-last weight and moments
    reference.step()
    opt.step()
    assert torch.equal(plain[0], q) and q.is_contiguous(memory_format=cl)
    q.data = q.data.contiguous()  # as after compile_network(False), or a resume without compile
    plain[0].grad, q.grad = g.clone(), g.clone()
    reference.step()
    opt.step()
    assert torch.equal(plain[0], q) and opt.state[q]["exp_avg"].is_contiguous()
    assert torch.equal(reference.state[plain[0]]["exp_avg"], opt.state[q]["exp_avg"])
    assert memory_order_view(torch.zeros(3, 4)) is None and memory_order_view(torch.zeros(4, 3).t()).is_contiguous()
    assert memory_order_view(torch.zeros(4, 6)[:, ::2]) is None  # gaps: not dense
