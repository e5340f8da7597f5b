"""The tile-config policy of ``kernels/configs.py``: bounded candidates, one timing per key, cache,
failing configs skipped, the FUSEDAD_AUTOTUNE switch, and no timing where none may run."""
import pytest
import torch

from fusedad.kernels import configs


@pytest.fixture(autouse=True)
def _empty_cache():
    configs.clear_cache()
    yield
    configs.clear_cache()


def _fake_bench(times):
    """bench(fn) that runs fn once and returns the time assigned to the config it ran."""
    ran = []

    def bench(fn):
        cfg = fn()
        ran.append(cfg)
        return times(cfg)

    return bench, ran


@pytest.mark.parametrize("M", [1, 16, 17, 128, 129, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_candidate_sets_are_bounded(M, dtype):
    cands = configs.candidates(M, 4096, 4096, dtype)
    assert 1 <= len(cands) <= 6 and len(set(cands)) == len(cands)
    for c in cands:
        assert all(v & (v - 1) == 0 for v in (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K)), c  # powers of two
        assert min(c.BLOCK_M, c.BLOCK_N, c.BLOCK_K) >= 16  # tl.dot's minimum


def test_m_buckets():
    assert [configs.m_bucket(m) for m in (1, 16, 17, 100, 8192, 100000)] == [16, 16, 32, 128, 8192, 8192]


def test_tuned_once_then_cached(monkeypatch):
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    cands = configs.candidates(256, 512, 512, torch.bfloat16)
    best = cands[2]
    bench, ran = _fake_bench(lambda c: 1.0 if c == best else 2.0)
    key = ("dev", "k", 256)
    assert configs.tuned_config(key, 256, 512, 512, torch.bfloat16, lambda c: c, bench) == best
    assert ran == cands  # each candidate timed exactly once
    assert configs.tuned_config(key, 256, 512, 512, torch.bfloat16, lambda c: c, bench) == best
    assert len(ran) == len(cands)  # the second call is a cache hit


def test_failing_configs_are_skipped(monkeypatch):
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    cands = configs.candidates(4096, 4096, 4096, torch.bfloat16)

    def run(c):
        if c.BLOCK_M * c.BLOCK_N >= 128 * 256:
            raise RuntimeError("out of resources: shared memory")  # what Triton raises for a too-big tile
        return c

    bench, ran = _fake_bench(lambda c: c.BLOCK_M * c.BLOCK_N)  # bigger (failing) tiles would look faster
    cfg = configs.tuned_config(("dev", "k"), 4096, 4096, 4096, torch.bfloat16, run, bench)
    assert cfg.BLOCK_M * cfg.BLOCK_N < 128 * 256 and cfg in cands


@pytest.mark.parametrize("how", ["env", "tune=False"])
def test_no_timing_when_switched_off(monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("FUSEDAD_AUTOTUNE", "0")

    def bench(fn):
        raise AssertionError("must not time anything")

    cfg = configs.tuned_config(("dev", "k"), 64, 64, 64, torch.float32, lambda c: c, bench, tune=(how == "env"))
    assert cfg == configs.candidates(64, 64, 64, torch.float32)[0]  # the heuristic's pick


def test_interpreter_config_is_small_and_covers_tiny_shapes():
    c = configs.interpreter_config(3, 100, 7)
    assert (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K) == (16, 64, 16)


def test_sm90_compile_covers_every_variant_at_every_bucket():
    """tests/sm90_compile.py lowers (and checks for spills) each variant at the heuristic tile of each M
    bucket; its bucket rows must hit every distinct heuristic pick of the config space."""
    from sm90_compile import BUCKETS, rows

    from fusedad.kernels import variants

    lowered = {(variant, M) for _, variant, _, _, _, M in rows()}
    assert {(v.name, M) for v in variants.VARIANTS for M in BUCKETS.values()} <= lowered
    for v in variants.VARIANTS:
        picks = {v.config_space(M, 4096, 4096, torch.bfloat16)[0] for M in (1, 16, 17, 64, 128, 129, 512, 8192)}
        assert picks == {v.config_space(M, 4096, 4096, torch.bfloat16)[0] for M in BUCKETS.values()}


def test_accumulating_launch_is_never_timed(monkeypatch):
    """Timing an accumulating launch would add dW into main_grad once per timed run: it must take the
    config tuned for the same launch without accumulation (or the heuristic), and time nothing."""
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    M, N, K, dtype = 512, 256, 384, torch.bfloat16
    cands = configs.candidates(M, N, K, dtype)
    flags = dict(ACT=2, COMPUTE_DX=False, COMPUTE_DW=True, COMPUTE_DB=False, ACCUMULATE_DW=True)

    def no_timing(fn):
        raise AssertionError("an accumulating launch was timed")

    def launch(flags, bench):
        return configs.launch_config("H100", "linear_bwd", flags, M, N, K, dtype, lambda c: c, bench)

    assert launch(flags, no_timing) == cands[0]  # nothing tuned yet: the heuristic pick
    bench, ran = _fake_bench(lambda c: 1.0 if c == cands[-1] else 2.0)
    assert launch(dict(flags, ACCUMULATE_DW=False), bench) == cands[-1]  # the plain launch is tuned
    assert ran == cands
    assert launch(flags, no_timing) == cands[-1]  # ...and the accumulating one reuses its choice


def test_traced_launch_is_never_timed(monkeypatch):
    """Inside a torch.compile trace nothing may run: a cache hit or the heuristic."""
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)

    def no_timing(fn):
        raise AssertionError("a traced launch was timed")

    cfg = configs.launch_config("H100", "linear_fwd", {"ACT": 0}, 64, 64, 64, torch.float32, lambda c: c, no_timing,
                                traced=True)
    assert cfg == configs.candidates(64, 64, 64, torch.float32)[0]


@pytest.mark.parametrize("M", [1, 100, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_tangent_configs_hold_two_accumulators_without_spilling(M, dtype):
    """Forward mode keeps two accumulators: ≤ 32 fp32 values per thread each (the rule the sm_90 spill
    measurements gave), and never an empty space."""
    cands = configs.tangent_candidates(M, 4096, 4096, dtype)
    assert cands and set(cands) <= set(configs.candidates(M, 4096, 4096, dtype))
    assert all(c.BLOCK_M * c.BLOCK_N <= 1024 * c.num_warps for c in cands)
