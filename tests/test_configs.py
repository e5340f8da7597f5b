"""The tile-config policy of ``kernels/configs.py``: bounded candidates, one timing per key, cache,
failing configs skipped, the FUSEDAD_AUTOTUNE switch, no timing where none may run, and the on-disk cache."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fusedad.kernels import configs


@pytest.fixture(autouse=True)
def _empty_cache(monkeypatch, tmp_path):
    """No tuned results in memory, and an empty on-disk cache of the test's own (never the user's)."""
    monkeypatch.setenv("FUSEDAD_CACHE_DIR", str(tmp_path / "cache"))
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
    """A config that raises when launched (Triton's out-of-resources for a too-big tile) is never chosen,
    even where it would have looked fastest."""
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    cands = configs.candidates(4096, 4096, 4096, torch.bfloat16)
    failing = [c for c in cands if c.BLOCK_N == 256]
    assert failing and len(failing) < len(cands)

    def run(c):
        if c in failing:
            raise RuntimeError("out of resources: shared memory")  # what Triton raises for a too-big tile
        return c

    bench, ran = _fake_bench(lambda c: c.BLOCK_M * c.BLOCK_N)
    cfg = configs.tuned_config(("dev", "k"), 4096, 4096, 4096, torch.bfloat16, run, bench)
    usable = [c for c in cands if c not in failing]
    assert cfg == min(usable, key=lambda c: c.BLOCK_M * c.BLOCK_N) and ran == usable


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
    kernel_rows = [v for v in variants.VARIANTS if not v.is_torch]  # torch rows have no kernel to lower
    assert {(v.name, M) for v in kernel_rows for M in BUCKETS.values()} <= lowered
    for v in kernel_rows:
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


# --- the on-disk cache -------------------------------------------------------------------------------

def _no_timing(fn):
    raise AssertionError("timed although a tuned result was on disk")


def _tune_once(key=("H100", "fwd", 4096), M=4096):
    """Tune ``key`` with a fake timer that makes the last candidate the fastest; returns (best, ran)."""
    cands = configs.candidates(M, 512, 512, torch.bfloat16)
    bench, ran = _fake_bench(lambda c: 1.0 if c == cands[-1] else 2.0)
    return configs.tuned_config(key, M, 512, 512, torch.bfloat16, lambda c: c, bench), ran, cands


def test_tuned_results_are_written_to_disk_and_read_back(monkeypatch, tmp_path):
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    best, ran, cands = _tune_once()
    assert best == cands[-1] and ran == cands
    path = configs.cache_path()
    assert path.startswith(str(tmp_path / "cache")) and os.path.basename(path).startswith("autotune-")
    with open(path) as f:
        data = json.load(f)
    assert data["fingerprint"] == configs.fingerprint() and len(data["entries"]) == 1
    configs.clear_cache()  # a "new process": nothing in memory
    assert configs.tuned_config(("H100", "fwd", 4096), 4096, 512, 512, torch.bfloat16, lambda c: c, _no_timing) == best
    # FUSEDAD_AUTOTUNE=0: the heuristic, the disk is not read
    configs.clear_cache()
    monkeypatch.setenv("FUSEDAD_AUTOTUNE", "0")
    assert configs.tuned_config(("H100", "fwd", 4096), 4096, 512, 512, torch.bfloat16, lambda c: c, _no_timing) == cands[0]


def test_traced_launch_takes_the_disk_result(monkeypatch):
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    cands = configs.candidates(4096, 512, 512, torch.bfloat16)
    bench, _ = _fake_bench(lambda c: 1.0 if c == cands[1] else 2.0)
    assert configs.launch_config("H100", "fwd", {"ACT": 0}, 4096, 512, 512, torch.bfloat16, lambda c: c, bench) == cands[1]
    configs.clear_cache()
    assert configs.launch_config("H100", "fwd", {"ACT": 0}, 4096, 512, 512, torch.bfloat16, lambda c: c, _no_timing,
                                 traced=True) == cands[1]


def test_a_second_process_times_nothing(monkeypatch, tmp_path):
    """Two real processes on one cache directory: the first tunes (fake timer), the second must not time."""
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    code = textwrap.dedent("""
        import sys, torch
        from fusedad.kernels import configs
        cands = configs.candidates(4096, 512, 512, torch.bfloat16)
        def bench(fn):
            if sys.argv[1] == "second":
                raise SystemExit("the second process timed a config")
            return 1.0 if fn() == cands[2] else 2.0
        best = configs.tuned_config(("H100", "fwd", 4096), 4096, 512, 512, torch.bfloat16, lambda c: c, bench)
        assert best == cands[2], best
        print("ok")
    """)
    env = dict(os.environ, FUSEDAD_CACHE_DIR=str(tmp_path / "shared"))
    env.pop("TRITON_INTERPRET", None)
    for which in ("first", "second"):
        proc = subprocess.run([sys.executable, "-c", code, which], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", (which, proc.stdout, proc.stderr[-2000:])


def test_new_versions_or_kernel_source_start_a_new_file(monkeypatch):
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    _tune_once()
    old = configs.cache_path()
    real = configs.fingerprint()
    monkeypatch.setattr(configs, "fingerprint", lambda: dict(real, kernels="edited"))
    configs.clear_cache()
    assert configs.cache_path() != old
    best, ran, cands = _tune_once()
    assert ran == cands  # tuned again: the old results are for other kernels


def test_fingerprint_hashes_the_kernel_source():
    fp = configs.fingerprint()
    assert fp["torch"] == torch.__version__ and len(fp["kernels"]) == 16
    here = os.path.dirname(configs.__file__)
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(here) if f.endswith(".py")):
        with open(os.path.join(here, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    assert fp["kernels"] == digest.hexdigest()[:16]


def test_export_and_load(monkeypatch, tmp_path):
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    best, _, _ = _tune_once()
    exported = tmp_path / "tuned.json"
    assert configs.export_cache(str(exported)) == 1
    configs.clear_cache(disk=True)  # another machine: nothing in memory or on disk
    assert not os.path.exists(configs.cache_path())
    assert configs.load_cache(str(exported)) == 1
    assert configs.tuned_config(("H100", "fwd", 4096), 4096, 512, 512, torch.bfloat16, lambda c: c, _no_timing) == best
    configs.clear_cache()  # ...and it was written through to this machine's cache file
    assert configs.tuned_config(("H100", "fwd", 4096), 4096, 512, 512, torch.bfloat16, lambda c: c, _no_timing) == best
    # A file from other versions / kernels is refused unless asked for
    data = json.loads(exported.read_text())
    data["fingerprint"]["triton"] = "0.0"
    exported.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="tuned for"):
        configs.load_cache(str(exported))
    assert configs.load_cache(str(exported), strict=False) == 1


def test_stale_or_corrupt_entries_are_ignored(monkeypatch):
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    path = configs.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    key = ("H100", "fwd", 4096)
    gone = {"variant": None, "config": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=1, num_stages=1)}
    with open(path, "w") as f:
        json.dump({"fingerprint": configs.fingerprint(), "entries": {configs._key_str(key): gone}}, f)
    best, ran, cands = _tune_once(key)  # a config no longer in the space: tuned afresh
    assert ran == cands and best == cands[-1]
    configs.clear_cache()
    with open(path, "w") as f:
        f.write("{not json")
    best, ran, cands = _tune_once(key)
    assert ran == cands


def test_variant_and_config_pairs_round_trip(monkeypatch):
    """The tuner's items for a forward launch are (variant name, config) pairs; the disk keeps both."""
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    pairs = [("linear_fwd_tma", c) for c in configs.tma_candidates(4096, 512, 512, torch.bfloat16)]
    pairs += [("linear_fwd", c) for c in configs.candidates(4096, 512, 512, torch.bfloat16)[:2]]
    bench, ran = _fake_bench(lambda item: 1.0 if item == pairs[-1] else 2.0)
    key = ("H100", "fwd", 4096)
    assert configs.tuned_config(key, 4096, 512, 512, torch.bfloat16, lambda i: i, bench, space=lambda *_: pairs) == pairs[-1]
    configs.clear_cache()
    assert configs.tuned_config(key, 4096, 512, 512, torch.bfloat16, lambda i: i, _no_timing,
                                space=lambda *_: pairs) == pairs[-1]


def _problem(M, N, K, dtype=torch.bfloat16, aligned=True):
    from fusedad.kernels import variants

    x = torch.zeros(M, K, dtype=dtype) if aligned else torch.zeros(K, M, dtype=dtype).t()
    w, y = torch.zeros(N, K, dtype=dtype), torch.zeros(M, N, dtype=dtype)
    return variants.Problem(M, N, K, dtype, (x, w, None, y, None), dict(INT64=False))


@pytest.mark.parametrize("M", [1, 16, 100, 4096])
@pytest.mark.parametrize("aligned", [True, False])
def test_tuning_space_is_bounded_applicable_and_heuristic_first(M, aligned):
    from fusedad.kernels import variants

    # N = 64: one N tile, so that the decode plan splits K (many N tiles alone fill the waves: one split,
    # and the split-K row no longer applies)
    p = _problem(M, 64, 512, aligned=aligned)
    pairs = variants.tuning_space("fwd", p)
    first = variants.select("fwd", p)
    assert pairs[0] == (first, first.config_space(M, 64, 512, torch.bfloat16)[0])  # = FUSEDAD_AUTOTUNE=0's pick
    assert 1 <= len(pairs) <= variants.MAX_TUNING_PAIRS and len(set(pairs)) == len(pairs)
    names = {v.name for v, _ in pairs}
    assert all(v.applies(p) for v, _ in pairs)
    assert ("linear_fwd_splitk" in names) == (M <= 16)
    assert ("linear_fwd_tma_persistent" in names) == aligned  # non-default variants are tuned too
    assert "linear_fwd" in names and "linear_fwd_splitk_reduce" not in names
    with variants.use("linear_fwd"):  # a forced variant: only its tiles
        assert {v.name for v, _ in variants.tuning_space("fwd", p)} == {"linear_fwd"}


def test_disk_keys_are_readable():
    assert configs._key_str(("H100", "fwd", torch.bfloat16)) == "('H100', 'fwd', 'torch.bfloat16')"
    assert configs._key_str("a-key") == "('a-key',)"  # a plain string is one field, not its characters


@pytest.mark.parametrize("setting, enabled", [(None, True), ("1", True), ("yes", True), ("", True), ("0", False),
                                              (" Off ", False), ("FALSE", False), ("no", False)])
def test_autotune_setting_is_read_on_every_call(monkeypatch, setting, enabled):
    """FUSEDAD_AUTOTUNE=0/false/off/no (any case, spaces around) turns the tuner off; anything else or unset
    leaves it on — read per call, so a change mid-process applies (the answer is memoised per raw value)."""
    monkeypatch.setenv("FUSEDAD_AUTOTUNE", "1")
    assert configs.autotune_enabled()
    if setting is None:
        monkeypatch.delenv("FUSEDAD_AUTOTUNE")
    else:
        monkeypatch.setenv("FUSEDAD_AUTOTUNE", setting)
    assert configs.autotune_enabled() is enabled
    assert configs.autotune_setting() == (None if setting is None else os.fsencode(setting))
