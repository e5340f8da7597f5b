"""Capturing and sharing a model that uses fusedad: torch.jit.trace / script, torch.export, threads,
deepcopy, whole-model save/load, the meta device and module hooks.

The property that matters most: a captured model must re-run the kernels for new inputs. A trace that
recorded only the output's allocation would return stale memory, so every capture is checked on new
values and a new batch size, against plain ``nn`` layers, and (where the kernels run) by the launches
its replay records.
"""
import copy
import sys
import threading
import time

import pytest
import torch
from torch import nn

import fusedad
from conftest import DEVICES, randn, runs_kernels
from fusedad.kernels import configs
from fusedad.kernels import linear as kernels
from fusedad.kernels import record_launches

device_param = pytest.mark.parametrize("device", DEVICES)

TOL = dict(rtol=1e-5, atol=1e-5)


def _models(device):
    """(plain nn reference, converted copy): Linear+GELU, Linear+ReLU, Linear — three fused layers."""
    ref = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).to(device)
    return ref, fusedad.convert(copy.deepcopy(ref))


def _fwd_bwd(model, x):
    """Output and the gradients of the input and every parameter, for a fixed scalar loss."""
    x = x.detach().requires_grad_(True)
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    return y.detach(), grads


def _assert_same_fwd_bwd(model, ref, x):
    y, grads = _fwd_bwd(model, x)
    y_ref, grads_ref = _fwd_bwd(ref, x)
    torch.testing.assert_close(y, y_ref, **TOL)
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL)


# ---- threads ------------------------------------------------------------------------------------------

def _run_threads(n, target):
    """Run target(i) on n threads released together; re-raise the first exception of any of them."""
    barrier = threading.Barrier(n)
    errors = []

    def body(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@device_param
def test_threads_forward_backward_match_eager(device):
    """4 threads × forward+backward through one shared model, each checked against eager nn layers.
    Under the interpreter this fails without the launch lock (the interpreter patches global state)."""
    ref, model = _models(device)
    inputs = [[randn(5 + i, 8, device=device) for _ in range(3)] for i in range(4)]
    expected = [[_fwd_bwd(ref, x) for x in xs] for xs in inputs]
    results = [None] * 4

    def work(i):
        results[i] = [_fwd_bwd(model, x) for x in inputs[i]]

    _run_threads(4, work)
    for got_thread, want_thread in zip(results, expected):
        for (y, grads), (y_ref, grads_ref) in zip(got_thread, want_thread):
            torch.testing.assert_close(y, y_ref, **TOL)
            for g, g_ref in zip(grads, grads_ref):
                torch.testing.assert_close(g, g_ref, **TOL)


@device_param
def test_record_launches_is_process_wide(device):
    """A recorder sees launches made by other threads (the autograd engine launches CUDA backwards from
    its own worker thread, so a per-thread recorder would miss them)."""
    x, w = randn(3, 8, device=device), randn(4, 8, device=device)
    with record_launches() as log:
        worker = threading.Thread(target=fusedad.linear, args=(x, w, None, "relu"))
        worker.start()
        worker.join()
    assert [l.kernel for l in log] == (["linear_fwd"] if runs_kernels(device) else [])


@device_param
def test_nested_recorders_each_get_their_launches(device):
    """Closing an inner recorder leaves the outer one registered (both start as equal empty lists, so
    this needs removal by identity)."""
    x, w = randn(3, 8, device=device), randn(4, 8, device=device)
    with record_launches() as outer:
        with record_launches() as inner:
            pass
        fusedad.linear(x, w, None, "relu")
    expected = ["linear_fwd"] if runs_kernels(device) else []
    assert [l.kernel for l in outer] == expected and inner == []


@device_param
def test_recorders_opened_and_closed_on_many_threads(device):
    """Recorders come and go on 8 threads while the others launch: each sees all of its own thread's
    launches, and none is left registered afterwards. (Launches with an empty grid: recorded, nothing
    run, so the loop is fast enough to interleave.)"""
    if not runs_kernels(device):
        pytest.skip("the eager backend launches no kernel, so there is nothing to record")
    per_thread = 200

    def work(i):
        for _ in range(per_thread):
            with record_launches() as log:
                kernels._launch(None, f"probe{i}", lambda c: (0,), (), {}, 1, 1, 1, torch.float32,
                                torch.device(device))
            assert [l.kernel for l in log].count(f"probe{i}") == 1

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        _run_threads(8, work)
    finally:
        sys.setswitchinterval(switch)
    assert kernels._RECORDERS == ()


def test_autotune_tunes_a_new_key_once_across_threads(monkeypatch):
    """4 threads miss the cache on one key at once: one timing search runs, all get its pick."""
    monkeypatch.setenv("FUSEDAD_AUTOTUNE", "1")
    configs.clear_cache()
    timed = []

    def bench(fn):
        fn()
        time.sleep(0.01)  # a slow measurement: the other threads arrive while it runs
        return float(len(timed))

    picks = [None] * 4

    def work(i):
        picks[i] = configs.tuned_config("capture-test-key", 256, 256, 256, torch.float16, timed.append, bench)

    try:
        _run_threads(4, work)
    finally:
        configs.clear_cache()
    assert len(timed) == len(configs.candidates(256, 256, 256, torch.float16))
    assert len(set(picks)) == 1 and picks[0] == timed[0]  # bench rises per run: the first one is fastest
