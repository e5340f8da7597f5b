"""What a run covers: the suites and their settings, the implementations, the repetitions.

Four presets (``make_plan``): full and ``--quick``, each for CUDA (real shapes) and for CPU (the Triton
interpreter costs ~12 ms per forward launch and ~70 ms per backward even at 8×32×64 — measured here,
torch 2.13 / triton 3.9 — so CPU runs use tiny shapes and their timings are not performance figures).
Run-wide knobs are set here; each suite's own axes (shapes, dtypes, models) come from its ``preset``.
CLI options then narrow or override both.
"""
import dataclasses

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

#: Implementations and what each is.
IMPLS = {"eager": "the eager PyTorch model, always run: the reference", "fusedad": "fusedad.convert of it",
         "compile": "torch.compile of the eager model", "cublaslt": "torch._addmm_activation, cuBLASLt's fused "
         "epilogue: CUDA, forward with bias + relu/gelu_tanh",
         "floor": "the GEMM floor of a backward: dX = dZ·W and dW = dZᵀ·X by two torch.mm (cuBLAS on CUDA) on a "
         "given dZ (backward suite; a reference row, checked on dX and dW only)",
         "F.linear": "the bare torch.nn.functional.linear with bias, no activation (forward suite; a reference "
         "row, checked against F.linear in fp64)",
         "copy": "a device copy of the weight's bytes, torch.empty_like(w).copy_(w) (forward suite, decode cases: "
         "the bandwidth reference)"}
IMPL_LABELS = {"eager": "eager", "fusedad": "fusedad", "compile": "torch.compile",
               "cublaslt": "cuBLASLt epilogue", "planted-mismatch": "planted-mismatch", "floor": "GEMM floor",
               "F.linear": "F.linear", "copy": "weight copy"}

#: Row impl of a fusedad kernel variant run through ``variants.use(name)`` (the backward and forward suites).
VARIANT_IMPL = "fusedad:{}"


def is_fusedad(impl):
    """True for fusedad's rows: ``fusedad`` and ``fusedad:<kernel variant>``."""
    return impl == "fusedad" or impl.startswith(VARIANT_IMPL.format(""))

CPU_LABEL = "cpu-interpreter, tiny shapes, correctness only"
CPU_TIMING_NOTE = "cpu-interpreter (not a performance figure)"


@dataclasses.dataclass(frozen=True)
class Shape:
    """One linear layer: x (M, K) · Wᵀ (K, N) -> (M, N)."""

    M: int
    K: int
    N: int
    tag: str = ""

    @property
    def label(self):
        dims = f"M{self.M} K{self.K} N{self.N}"
        return f"{self.tag} {dims}" if self.tag else dims

    @classmethod
    def parse(cls, text):
        """'MxKxN' (e.g. '8192x4096x14336') -> Shape."""
        try:
            M, K, N = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {text!r}: expected MxKxN, e.g. 8192x4096x14336") from None
        return cls(M, K, N)


@dataclasses.dataclass
class Plan:
    """Everything a run does; built by ``make_plan`` and narrowed by CLI options."""

    device: str                      # "cuda" | "cpu"
    quick: bool
    settings: dict                   # suite name -> its settings (its preset, CLI overrides), in run order
    impls: tuple                     # keys of IMPLS
    rounds: int                      # interleaved rounds per case (median of the round medians)
    rep_ms: float                    # do_bench rep per implementation per round (CUDA)
    label: str                       # printed with every table and plot
    skipped_impls: dict = dataclasses.field(default_factory=dict)  # impl -> reason (whole run)
    plant_mismatch: bool = False     # test hook: add a deliberately wrong implementation
    seed: int = 0

    @property
    def suites(self):
        return tuple(self.settings)

    @property
    def is_performance_run(self):
        """False on CPU: interpreted kernels vs native eager — the times say nothing about speed."""
        return self.device == "cuda"


def make_plan(device, quick, suites=None):
    """The preset for a device ("cuda" / "cpu") and ``--quick``, for ``suites`` (default: all)."""
    from .suites import SUITES

    settings = {name: SUITES[name].preset(device, quick) for name in (suites or SUITES)}
    if device == "cuda":  # quick: meant for under three minutes on an H100/H200 (mostly compiling, autotuning)
        return Plan(device, quick, settings, tuple(IMPLS), rounds=3 if quick else 5, rep_ms=10.0 if quick else 25.0,
                    label="cuda quick: seed Net3 + one Net3 layer, bf16" if quick else "cuda full")
    skipped = {"cublaslt": "CUDA only", **({"compile": "skipped: cpu quick"} if quick else {})}
    return Plan(device, quick, settings, tuple(i for i in IMPLS if i not in skipped), rounds=2 if quick else 3,
                rep_ms=0.0, label=CPU_LABEL, skipped_impls=skipped)
