"""Tile configurations: one fixed small config under the interpreter, a shape heuristic on CUDA, and a
bounded per-bucket autotuner whose results are cached per device and shape.

Autotuning rules:
* what is timed is a bounded list of (variant, config) pairs (``variants.tuning_space``): the heuristic
  variant's configs first, then the other applicable variants' first configs;
* never under the interpreter (one small config: interpreted cost grows with the program count and the
  tile size, ~0.4 ms per launch on this project's 2-core CPU machines);
* ``FUSEDAD_AUTOTUNE=0`` turns it off: the heuristic config is used as is;
* at most ``len(candidates(...))`` (≤ 6) configs are timed per (device, kernel, flags, M bucket, N, K,
  dtype), each for a few milliseconds, once per process; compiled kernels are reused across shapes, so
  a new shape in a known bucket costs timing only.

On-disk cache: every tuned result is also written to ``cache_path()``, a JSON file in ``cache_dir()``
(``$FUSEDAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedad``, else ``~/.cache/fusedad``) named
``autotune-<fingerprint>.json``. The fingerprint hashes the torch and Triton versions and the source of
the kernels (``kernels/*.py``): a new version or an edited kernel starts a new file; the device model is
in every entry's key. A second process on the machine reads it and times nothing. ``export_cache`` /
``load_cache`` copy the results between machines. ``FUSEDAD_AUTOTUNE=0`` neither reads nor writes it.
"""
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import threading
import warnings

import torch
import triton


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def launch_kwargs(self):
        return dataclasses.asdict(self)


def _pow2_clamp(n, lo, hi):
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


#: The one "config" of a torch row (``torch_rows.py``): ATen chooses its own algorithm, so there are no
#: tiles to tune; the fields are placeholders that only name the entry in the cache.
TORCH_CONFIG = TileConfig(BLOCK_M=1, BLOCK_N=1, BLOCK_K=1, GROUP_M=1, num_warps=1, num_stages=1)


def torch_config(M, N, K, dtype):
    """The config space of a torch row: its single placeholder."""
    return [TORCH_CONFIG]


def interpreter_config(M, N, K):
    """Small power-of-two tiles (16 … 64) that cover tiny shapes in one or few programs."""
    return TileConfig(BLOCK_M=_pow2_clamp(M, 16, 64), BLOCK_N=_pow2_clamp(N, 16, 64), BLOCK_K=_pow2_clamp(K, 16, 64),
                      GROUP_M=8, num_warps=4, num_stages=1)


def m_bucket(M):
    """Autotune bucket for the row count: powers of two from 16 up to 8192 (M ≤ 16 is one bucket)."""
    return _pow2_clamp(M, 16, 8192)


def _scale_k(cfgs, dtype):
    # The same shared-memory budget holds half the K depth at 4-byte and a quarter at 8-byte elements.
    if dtype == torch.float32:
        return [dataclasses.replace(c, BLOCK_K=max(16, c.BLOCK_K // 2)) for c in cfgs]
    return cfgs


def candidates(M, N, K, dtype):
    """The bounded config set timed for this shape bucket (first entry = the heuristic's pick).

    Every 16-bit entry compiles for sm_90 without register spills in both kernels (with the costliest
    epilogue/prologue, gelu_tanh), and fits in shared memory — checked with Triton 3.9 + ptxas and
    cuobjdump, see bench/NOTES.md; tests/test_sm90_compile.py keeps the heuristic picks spill-free.
    Dropped for spilling: 256×128 and 128×256 tiles with 8 warps, 32×64×128 and 16×·×256 backward.
    """
    if dtype == torch.float64:
        return [TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
                TileConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
                TileConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)]
    if M <= 16:
        # Decode: the weight read dominates; narrow-M tiles, deep K, many N tiles to fill the SMs.
        cfgs = [TileConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=4),
                TileConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=4)]
    elif M <= 128:
        cfgs = [TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
                TileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
                TileConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4)]
    else:
        cfgs = [TileConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                TileConfig(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
                TileConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4),
                TileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)]
    return _scale_k(cfgs, dtype)


def decode_candidates(M, N, K, dtype):
    """The split-K decode path (M ≤ 16): one 16-row tile, deep K blocks; the split count follows from
    the N tiles (``variants.splitk_plan``). 64-wide N tiles first: twice the CTAs of 128 for the same W."""
    if dtype == torch.float64:
        return [TileConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)]
    cfgs = [TileConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
            TileConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
            TileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=3)]
    return _scale_k(cfgs, dtype)


def tma_candidates(M, N, K, dtype):
    """The TMA-descriptor forward (plain and persistent grids): ``candidates``' tiles for M > 16 (its
    decode tiles too for a forced small-M launch), plus 128×256×64 with 8 warps for large M when it
    lowers without spills (see bench/NOTES.md, *Forward v2*)."""
    cfgs = candidates(M, N, K, dtype)
    if M > 128 and dtype in (torch.bfloat16, torch.float16):
        cfgs = cfgs + [TileConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)]
    return cfgs


def tma_ws_candidates(M, N, K, dtype):
    """The warp-specialised TMA forward: Triton specialises the tile loop only with 4 warps (one consumer
    warpgroup; it then raises the consumers to 256 registers with setmaxnreg). 64×256 fails to lower
    (Triton 3.9: no wgmma layout for its B operand in the warp-specialised loop; before the kernel stored
    whole tiles when warp-specialised, a layout mismatch at the subtiled epilogue)."""
    if M <= 16:
        return [TileConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)]
    cfgs = [TileConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
            TileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)]
    return _scale_k(cfgs, dtype)


def tangent_candidates(M, N, K, dtype):
    """``candidates`` for the forward-mode kernel: it holds two accumulators (primal and tangent), so a
    tile keeps at most 32 fp32 accumulator values per thread each (BLOCK_M·BLOCK_N ≤ 1024·num_warps).

    Measured (sm_90 lowering, Triton 3.9 + ptxas/cuobjdump, bf16, gelu_tanh; ``python
    tests/sm90_compile.py --sweep-candidates``): 128×128 with 8 warps spills 224 B per thread, 64×128
    and 128×64 with 4 warps spill 24 / 192 B, and 64×256 needs 244 KiB of shared memory (four operand
    tiles per stage); the tiles kept here use 178–180 registers and no stack.
    """
    return [c for c in candidates(M, N, K, dtype) if c.BLOCK_M * c.BLOCK_N <= 1024 * c.num_warps]


def elementwise_candidates(M, N, K, dtype):
    """The tile of the dZ pass (elementwise over M×N, no reduction dimension: BLOCK_K is unused), used
    as is (never timed: its BLOCK_M also fixes how many db partial sums there are). 32×128 with 4 warps:
    32 elements per thread, contiguous 128-wide rows for coalesced 16-bit loads. A guess, to be checked
    against copy bandwidth on a GPU."""
    return [TileConfig(BLOCK_M=32, BLOCK_N=128, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1)]


# ``os.environ.get`` encodes the name and decodes the value on every read: 1.1 µs per call (timeit, the
# 2-core CPU VM, Python 3.11.7, 2026-12-07), against 33 ns for a lookup in the mapping's own dict, which
# CPython keeps in step with every ``os.environ`` write (POSIX: bytes keys). Launches read it every call.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_AUTOTUNE_NAME = os.environ.encodekey("FUSEDAD_AUTOTUNE") if hasattr(os.environ, "encodekey") else None


def autotune_setting():
    """FUSEDAD_AUTOTUNE as set (None when unset; raw, as the environment holds it): a value to key by."""
    if _ENVIRON_DATA is not None and _AUTOTUNE_NAME is not None:
        return _ENVIRON_DATA.get(_AUTOTUNE_NAME)
    return os.environ.get("FUSEDAD_AUTOTUNE")


_ENABLED_BY_SETTING = {}  # raw setting -> autotuning on? (a process sees a handful of values)


def autotune_enabled():
    """False where FUSEDAD_AUTOTUNE is 0 / false / off / no (any case, spaces around); on otherwise."""
    setting = autotune_setting()
    enabled = _ENABLED_BY_SETTING.get(setting)
    if enabled is None:
        text = "1" if setting is None else os.fsdecode(setting)
        enabled = _ENABLED_BY_SETTING[setting] = text.strip().lower() not in ("0", "false", "off", "no")
    return enabled


_CACHE = {}
#: Counts the changes of ``_CACHE`` (a result tuned, read from disk, loaded, or the cache cleared): the
#: launcher's per-signature plans (``kernels/linear.py``) are valid only for the count they were made at.
_GENERATION = 0


def generation():
    """How many times the tuned results of this process have changed (see ``_GENERATION``)."""
    return _GENERATION


def _changed():
    global _GENERATION
    _GENERATION += 1


#: key -> [(item, milliseconds or None if it failed)] for every key this process timed, in timing order
#: (what ``tuning_report`` returns: which row won and by how much).
_TIMINGS = {}
# Held while a key is tuned: threads asking for the same new key wait for one timing search instead of
# running their own at once (their launches would also skew each other's timings). Hits skip it. Also
# guards the on-disk layer (_DISK, the file).
_TUNE_LOCK = threading.Lock()
_DISK = None  # key string -> encoded result, read from cache_path() on first use (None: not read yet)


def cache_dir():
    """Where tuned results are kept on disk: ``$FUSEDAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedad``,
    else ``~/.cache/fusedad``."""
    env = os.environ.get("FUSEDAD_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fusedad")


@functools.lru_cache(maxsize=None)
def fingerprint():
    """What a tuned result is valid for besides its key: torch and Triton versions and a hash of the
    kernels' source (every ``kernels/*.py``: tile bodies, variant table, config spaces)."""
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(here) if f.endswith(".py")):
        with open(os.path.join(here, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    return {"torch": torch.__version__, "triton": triton.__version__, "kernels": digest.hexdigest()[:16]}


def cache_path():
    fp = fingerprint()
    tag = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"autotune-{tag}.json")


def _key_str(key):
    key = key if isinstance(key, tuple) else (key,)
    return repr(tuple(str(k) if isinstance(k, torch.dtype) else k for k in key))


def _encode(item):
    if isinstance(item, TileConfig):
        return {"variant": None, "config": item.launch_kwargs()}
    name, cfg = item
    return {"variant": name, "config": cfg.launch_kwargs()}


def _decode(entry):
    cfg = TileConfig(**entry["config"])
    return cfg if entry.get("variant") is None else (entry["variant"], cfg)


def _read(path):
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise ValueError(f"{path}: not a fusedad autotune cache")
    return data


def _disk_entries():
    """The on-disk entries (read once; call with _TUNE_LOCK held). An unreadable file counts as empty."""
    global _DISK
    if _DISK is None:
        _DISK = {}
        try:
            data = _read(cache_path())
            if data.get("fingerprint") == fingerprint():
                _DISK.update(data["entries"])
        except (OSError, ValueError):
            pass
    return _DISK


def _write_disk(new_entries):
    """Merge ``new_entries`` into the cache file (with what other processes wrote meanwhile); atomic
    replace, so a reader never sees half a file. Failures (read-only home, …) only warn."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            entries = _read(path)["entries"]
        except (OSError, ValueError):
            entries = {}
        entries.update(new_entries)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"fingerprint": fingerprint(), "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"fusedad: could not write the autotune cache {path}: {e}", stacklevel=3)


def tuned_config(key, M, N, K, dtype, run, bench, tune=True, space=None):
    """Best of ``space(M, N, K, dtype)`` (default ``candidates``) for ``key``, timed once and cached in
    memory and on disk.

    key:   hashable (device, kernel or direction, constexpr flags, m_bucket(M), N, K, dtype)
    space: items to time, the heuristic's first: TileConfigs, or (variant name, TileConfig) pairs
    run:   run(item) launches the kernel with that item (must be idempotent: it is called repeatedly)
    bench: bench(fn) -> milliseconds (``triton.testing.do_bench`` on CUDA)
    tune:  False where nothing may be timed (inside torch.compile tracing): cache hit or heuristic.
    A config that fails to compile or launch (e.g. out of shared memory) is skipped.
    """
    cfg = _CACHE.get(key)
    if cfg is not None:
        return cfg
    cands = (space or candidates)(M, N, K, dtype)
    if not autotune_enabled():
        return cands[0]
    with _TUNE_LOCK:
        if key in _CACHE:  # tuned by another thread while this one waited
            return _CACHE[key]
        entry = _disk_entries().get(_key_str(key))
        if entry is not None:
            try:
                item = _decode(entry)
            except (KeyError, TypeError):
                item = None
            if item is not None and item in cands:  # a result that is still in the space
                _CACHE[key] = item
                _changed()
                return item
        if not tune:
            return cands[0]
        best, best_ms, timed = cands[0], float("inf"), []
        for cfg in cands:
            try:
                ms = bench(lambda cfg=cfg: run(cfg))
            except Exception:  # noqa: BLE001 - OutOfResources / compile errors: not a usable config
                timed.append((cfg, None))
                continue
            timed.append((cfg, ms))
            if ms < best_ms:
                best, best_ms = cfg, ms
        _CACHE[key] = best
        _changed()
        _TIMINGS[key] = timed
        entry = dict(_encode(best), timings=[dict(_encode(c), ms=ms) for c, ms in timed])
        _disk_entries()[_key_str(key)] = entry
        _write_disk({_key_str(key): entry})
    return best


def tuning_report():
    """Every key this process timed: [(key, [(item, ms or None), ...])], in the order they were tuned.
    An item is a TileConfig or a (variant name, TileConfig) pair; the fastest is the one kept."""
    return list(_TIMINGS.items())


_KEY_FLAGS = {}  # a launch's flags in their call order -> the key's flags (sorted, ACCUMULATE_* off)


def _launch_key(device_name, kernel_name, flags, M, N, K, dtype):
    items = tuple(flags.items())
    key_flags = _KEY_FLAGS.get(items)
    if key_flags is None:
        # ACCUMULATE_* never key a result: an accumulating launch takes the same launch's plain choice.
        # (Memoised: sorting the flags was a visible part of a tuned launch's host work; the distinct
        # flag sets of a process are few — activations × bias × dtype flags × directions.)
        key_flags = _KEY_FLAGS[items] = tuple(sorted((k, False if k.startswith("ACCUMULATE_") else v)
                                                     for k, v in flags.items()))
    return (device_name, kernel_name, key_flags, m_bucket(M), N, K, dtype)


def cached_choice(device_name, kernel_name, flags, M, N, K, dtype):
    """The item tuned for this launch's key in this process (or loaded), else None; never times, never
    reads the disk (``launch_config`` does, once per key)."""
    if not _CACHE or not autotune_enabled():  # nothing tuned yet; autotuning off: the heuristic, not the cache
        return None
    return _CACHE.get(_launch_key(device_name, kernel_name, flags, M, N, K, dtype))


def launch_config(device_name, kernel_name, flags, M, N, K, dtype, run, bench, traced=False, space=None):
    """The config for one CUDA launch: ``tuned_config`` under the launch rules.

    * the key holds the device model, kernel (or direction, when variants are tuned too), constexpr
      flags, M bucket, N, K and dtype;
    * an accumulating launch (``ACCUMULATE_DW`` / ``ACCUMULATE_DX``) is never timed — each timed run would add into the
      output again — and takes the config tuned for the same launch without accumulation, or the heuristic;
    * ``traced`` (inside a torch.compile trace) times nothing either: a cache hit or the heuristic.
    """
    accumulating = bool(flags.get("ACCUMULATE_DW", False) or flags.get("ACCUMULATE_DX", False))
    key = _launch_key(device_name, kernel_name, flags, M, N, K, dtype)
    return tuned_config(key, M, N, K, dtype, run, bench, tune=not traced and not accumulating, space=space)


def export_cache(path):
    """Write every tuned result this process knows (tuned here, read from disk or loaded) to ``path``:
    a JSON file that ``load_cache`` reads on another machine with the same fusedad, torch and Triton."""
    with _TUNE_LOCK:
        entries = dict(_disk_entries())
        entries.update({_key_str(k): _encode(v) for k, v in _CACHE.items()})
        with open(path, "w") as f:
            json.dump({"fingerprint": fingerprint(), "entries": entries}, f, indent=1, sort_keys=True)
    return len(entries)


def load_cache(path, strict=True):
    """Read results written by ``export_cache`` (or a cache file) into this process and the on-disk cache.

    strict: a file from another torch/Triton version or other kernel source is refused (ValueError);
    with strict=False it is loaded anyway (entries whose config is no longer in the space are ignored
    at lookup). Returns the number of entries loaded."""
    data = _read(path)
    if strict and data.get("fingerprint") != fingerprint():
        raise ValueError(f"fusedad: {path} was tuned for {data.get('fingerprint')}, this is {fingerprint()}")
    with _TUNE_LOCK:
        _disk_entries().update(data["entries"])
        for key in [k for k in _CACHE if _key_str(k) in data["entries"]]:
            del _CACHE[key]  # the loaded result replaces this process's own
        _changed()
        _write_disk(data["entries"])
    return len(data["entries"])


def clear_cache(disk=False):
    """Forget this process's tuned results (the file is read again on next use); ``disk=True`` also
    deletes the cache file."""
    global _DISK
    with _TUNE_LOCK:
        _CACHE.clear()
        _changed()
        _TIMINGS.clear()
        _DISK = None
        if disk:
            try:
                os.remove(cache_path())
            except OSError:
                pass
