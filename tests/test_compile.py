"""torch.compile of the networks (`cosmolit fit --compile`, `cosmolit bench train --compile`)."""

from __future__ import annotations

import pytest
import torch

from cosmolit.backends.compiling import CompiledApart, CompiledCall, compile_errors, compile_refusal, tracing_check


class _CompileFailed(compile_errors()[0] if compile_errors() else RuntimeError):
    def __init__(self, msg="no C++ compiler found"):
        Exception.__init__(self, msg)


def _fake_compile(raises):
    def compile_(fn, *args, **kwargs):
        def run(*a, **k):
            raise raises
        return run
    return compile_


def test_compiled_call_falls_back_once_when_compilation_fails(monkeypatch):
    if not compile_errors():
        pytest.skip("this torch has no TorchDynamo")
    monkeypatch.setattr(torch, "compile", _fake_compile(_CompileFailed()))
    messages, hooks = [], []
    call = CompiledCall(lambda a: a * 2, "toy", echo=messages.append, prepare=lambda: hooks.append("prepare"),
                        restore=lambda: hooks.append("restore"))
    assert call.status == "on" and hooks == []
    assert torch.equal(call(torch.arange(3.0)), torch.tensor([0.0, 2.0, 4.0]))
    assert call.status == "failed" and hooks == ["prepare", "restore"]
    assert len(messages) == 1 and "torch.compile of toy failed" in messages[0] and "eager" in messages[0]
    assert torch.equal(call(torch.ones(2)), torch.full((2,), 2.0))
    assert len(messages) == 1 and hooks == ["prepare", "restore"]  # said once, and each hook ran once


def test_compiled_call_does_not_swallow_errors_of_the_computation(monkeypatch):
    monkeypatch.setattr(torch, "compile", _fake_compile(ValueError("shape mismatch")))
    call = CompiledCall(lambda a: a, "toy", echo=lambda m: None)
    with pytest.raises(ValueError, match="shape mismatch"):
        call(torch.ones(1))
    assert call.status == "on"


def test_a_real_error_wrapped_by_dynamo_is_raised_by_eager_and_not_blamed_on_compile(monkeypatch):
    if not compile_errors():
        pytest.skip("this torch has no TorchDynamo")
    monkeypatch.setattr(torch, "compile", _fake_compile(_CompileFailed("wrapped shape error")))
    messages = []
    call = CompiledCall(lambda a, b: a @ b, "toy", echo=messages.append)
    with pytest.raises(RuntimeError):  # eager's own error: the shapes do not multiply
        call(torch.ones(2, 3), torch.ones(2, 3))
    assert call.status == "on" and messages == []


def test_a_platform_that_refuses_torch_compile_runs_eager(monkeypatch):
    def refuse(fn, *args, **kwargs):
        raise RuntimeError("Python 3.11+ not yet supported for torch.compile")

    monkeypatch.setattr(torch, "compile", refuse)
    messages = []
    call = CompiledCall(lambda a: a + 1, "toy", echo=messages.append)
    assert call.status == "unavailable" and "unavailable" in messages[0]
    assert torch.equal(call(torch.zeros(2)), torch.ones(2))
    # a model with several compiled methods says it once, and its steps run eager
    from cosmolit.models.bnn import BayesianShapeCNN

    net = BayesianShapeCNN(targets=["e1", "e2"], filters=[4, 8], bands="gri", stamp=16, train_size=8,
                           target_stats=[[0.0, 0.2], [0.0, 0.2]])
    messages.clear()
    net.compile_network(True, messages.append)
    assert len(messages) == 1 and net.compile_status() == "unavailable"
    assert torch.isfinite(net.elbo_terms(torch.rand(2, 3, 16, 16), torch.zeros(2, 2))["loss"])


def test_compiled_apart_keeps_its_function_out_of_the_enclosing_graph():
    if tracing_check() is None:
        pytest.skip("no torch.compiler.is_compiling in this torch: the function stays inline")
    apart = CompiledApart(lambda x, s: torch.asinh(x / s))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)

    def net(x, s):
        return conv(apart(x, s)).square().mean()

    graphs = []  # the ops of every graph the enclosing torch.compile builds

    def record(gm, example_inputs):
        graphs.append(" ".join(str(n.target) for n in gm.graph.nodes))
        return gm.forward

    x, s = torch.rand(2, 3, 8, 8) * 50, torch.full((1, 3, 1, 1), 10.0)
    compiled = torch.compile(net, backend=record)
    torch.testing.assert_close(compiled(x, s), net(x, s))
    assert apart._compiled is not None  # it ran as a graph of its own
    assert any("conv2d" in g for g in graphs) and not any("asinh" in g for g in graphs)
    # an input that needs a gradient keeps the function inline, and differentiable
    graphs.clear()
    xg = x.clone().requires_grad_()
    compiled(xg, s).backward()
    assert any("asinh" in g for g in graphs) and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def _tiny_cnn():
    from cosmolit.models.cnn import ShapeCNN

    torch.manual_seed(0)
    return ShapeCNN(targets=["e1", "e2"], filters=[4, 8], bands="gri", stamp=16,
                    target_stats=[[0.0, 0.2], [0.0, 0.2]])


def test_compile_network_gives_the_eager_loss_and_gradients():
    torch.manual_seed(1)
    x, y = torch.rand(4, 3, 16, 16) * 50, torch.rand(4, 2) - 0.5
    eager, compiled = _tiny_cnn(), _tiny_cnn()
    keys = list(compiled.state_dict())
    messages = []
    compiled.compile_network(True, messages.append)
    refusal = compile_refusal()  # torch 2.0.x: eager, said once (test_torch_2_0_never_compiles)
    assert compiled.compile_status() == ("unavailable" if refusal else "on")
    losses = []
    for net in (eager, compiled):
        net.train()
        loss = net.loss_terms(x, y)["loss"]
        loss.backward()
        losses.append(loss.detach())
    assert compiled.compile_status() in (("unavailable",) if refusal else ("on", "failed"))  # failed: no compiler
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    convs = [m.weight for m in compiled.modules() if isinstance(m, torch.nn.Conv2d)]
    if compiled.compile_status() == "on":  # on a CPU the compiled network keeps its conv weights channels-last
        assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert list(compiled.state_dict()) == keys  # checkpoints are the same with or without compile
    checkpoint = {"state_dict": compiled.state_dict()}
    compiled.on_save_checkpoint(checkpoint)
    assert all(v.is_contiguous() for v in checkpoint["state_dict"].values())
    for (name, p), q in zip(eager.state_dict().items(), checkpoint["state_dict"].values()):
        assert p.shape == q.shape, name
    compiled.compile_network(False)
    assert compiled.compile_status() == "off" and "loss_terms" not in compiled.__dict__
    assert all(w.is_contiguous() for w in convs)  # eager steps run on contiguous weights again


def test_bnn_compiles_network_draw_and_kl_and_gives_the_eager_elbo():
    from cosmolit.models.bnn import BayesianShapeCNN

    def tiny():
        return BayesianShapeCNN(targets=["e1", "e2"], filters=[4, 8], bands="gri", stamp=16, train_size=8,
                                target_stats=[[0.0, 0.2], [0.0, 0.2]], init_scale=-3.0)

    torch.manual_seed(1)
    x, y = torch.rand(4, 3, 16, 16) * 50, torch.rand(4, 2) - 0.5
    eager, compiled = tiny(), tiny()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_network(True, lambda m: None)
    if compile_refusal() is None:
        assert {"_run_net", "_draw_guide", "_kl"} <= set(compiled.__dict__)
    else:
        assert compiled.compile_status() == "unavailable"
    assert "elbo_terms" not in compiled.__dict__  # Pyro's tracing and replay stay eager
    terms = []
    for net in (eager, compiled):
        torch.manual_seed(3)  # the same weight noise for both
        t = net.elbo_terms(x, y)
        t["loss"].backward()
        terms.append(t)
    for key in ("loss", "kl", "nll"):
        torch.testing.assert_close(terms[1][key].detach(), terms[0][key].detach(), rtol=1e-4, atol=1e-5, msg=key)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):  # float rounding, relative to the largest
        assert (q.grad - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-7, name
    compiled.compile_network(False)
    assert compiled.compile_status() == "off"


def test_torch_2_0_never_compiles(monkeypatch, tmp_path, synthetic_small_h5):
    """torch 2.0.x (the IPU stack): Inductor's CPU kernels gave inf losses on an AVX-512 Xeon, so a
    model asked to compile runs eager and says why in one line; auto and true alike, on any CPU."""
    monkeypatch.setattr(torch, "__version__", "2.0.1+cpu")
    reason = compile_refusal()
    assert reason and "torch 2.0.1+cpu" in reason and "inf" in reason
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    net, messages = _tiny_cnn(), []
    net.compile_network(True, messages.append)
    assert net.compile_status() == "unavailable" and messages == [f"{reason}; ShapeCNN.loss_terms runs eager"]
    x = torch.rand(2, 3, 16, 16) * 50
    assert torch.isfinite(net.loss_terms(x, torch.zeros(2, 2))["loss"])
    assert all(m.weight.is_contiguous() for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    from typer.testing import CliRunner

    from cosmolit.cli import app

    res = CliRunner().invoke(app, ["fit", "--model", "cnn", "--data", str(synthetic_small_h5), "--epochs", "1",
                                   "--batch-size", "8", "--accelerator", "cpu", "--compile", "--out",
                                   str(tmp_path / "run"), "-q"])
    assert res.exit_code == 0, res.output
    assert res.output.count("torch.compile is off with torch 2.0.1") == 1 and "about a minute" not in res.output
    monkeypatch.setattr(torch, "__version__", "2.1.0")
    assert compile_refusal() is None


def test_compile_is_refused_on_ipu():
    from cosmolit.bench.train import TrainBenchConfig

    with pytest.raises(ValueError, match="compile is for cpu and gpu"):
        TrainBenchConfig(batch_sizes=[2], steps=1, accelerator="ipu", compile=True)


def test_fit_with_compile(tmp_path, synthetic_small_h5):
    from typer.testing import CliRunner

    from cosmolit.checkpoint import read_checkpoint
    from cosmolit.cli import app

    res = CliRunner().invoke(app, ["fit", "--model", "cnn", "--data", str(synthetic_small_h5), "--epochs", "1",
                                   "--batch-size", "8", "--accelerator", "cpu", "--compile", "--out",
                                   str(tmp_path / "run"), "-q"])
    assert res.exit_code == 0, res.output
    assert "torch.compile" in res.output
    checkpoint = read_checkpoint(tmp_path / "run" / "model.ckpt")
    assert checkpoint["state_dict"] and not any("_orig_mod" in k for k in checkpoint["state_dict"])
    assert "compile: true" in checkpoint["cosmolit"]["config"]


@pytest.mark.parametrize("value", ["sometimes", 1])
def test_bad_compile_setting_is_one_clear_error(tmp_path, value):
    from cosmolit.errors import UsageError
    from cosmolit.train import load_fit_config

    with pytest.raises(UsageError, match="compile"):
        load_fit_config("cnn", None, {"trainer": {"compile": value}})
