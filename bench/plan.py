"""What a benchmark run covers: shapes, dtypes, activations, phases, implementations, repetitions.

Four presets (``make_plan``): full and ``--quick``, each for CUDA (real shapes) and for CPU (the Triton
interpreter costs ~12 ms per forward launch and ~70 ms per backward even at 8×32×64 — measured here,
torch 2.13 / triton 3.9 — so CPU runs use tiny shapes and their timings are not performance figures).
CLI options then narrow or override them.
"""
import dataclasses

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

#: Activation choices ("none" = plain linear); all are fused by fusedad.
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")

#: Layer phases. fwd: no_grad forward (the inference kernel). bwd: backward only, of a forward done
#: once outside the timing (dX, dW, db). fwd+bwd: both. fwd+bwd-frozenW: weight.requires_grad=False,
#: so no dW work (dX, db only). jvp: forward mode, primal + tangent of x (torch.func.jvp).
PHASES = ("fwd", "bwd", "fwd+bwd", "fwd+bwd-frozenW", "jvp")

#: Grad modes of the seed's Net3 experiment, plus a training step.
MODES = ("default", "no_grad", "inference_mode", "fwd+bwd")

#: Implementations. eager: nn.Linear + activation module. fusedad: fusedad.convert of that module.
#: compile: torch.compile(eager module). cublaslt: torch._addmm_activation (cuBLASLt epilogue; fwd only,
#: bias + relu/gelu_tanh, CUDA only).
IMPLS = ("eager", "fusedad", "compile", "cublaslt")
IMPL_LABELS = {"eager": "eager", "fusedad": "fusedad", "compile": "torch.compile",
               "cublaslt": "cuBLASLt epilogue", "planted-mismatch": "planted-mismatch"}

SUITES = ("modes", "layers", "memory")


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


@dataclasses.dataclass(frozen=True)
class Net3:
    """The seed's Net3: bias-free layers dims[0] → dims[1] → … → dims[-1], ReLU between, batch rows."""

    batch: int
    dims: tuple

    @property
    def layers(self):
        """(K, N) of each layer."""
        return tuple(zip(self.dims[:-1], self.dims[1:]))

    @property
    def label(self):
        return f"Net3 batch {self.batch}, " + "→".join(map(str, self.dims))


SEED_NET3 = Net3(256, (4096, 8192, 8192, 8192, 1))
TINY_NET3 = Net3(8, (32, 64, 64, 64, 1))

# Full CUDA layer shapes (issue 3): the seed's Net3 layers at M=256, LLM-style MLP GEMMs at M=8192,
# decode (M=1, 16) on an 8192×8192 weight, memory-bound (GUIDE §5: ~3.0 TB/s effective eager).
CUDA_SHAPES = (
    Shape(256, 4096, 8192, "net3-l0"), Shape(256, 8192, 8192, "net3-l1"), Shape(256, 8192, 1, "net3-l3"),
    Shape(8192, 4096, 4096, "llm-qkv"), Shape(8192, 4096, 14336, "llm-up"), Shape(8192, 14336, 4096, "llm-down"),
    Shape(1, 8192, 8192, "decode"), Shape(16, 8192, 8192, "decode"),
)
CPU_SHAPES = (
    Shape(8, 32, 64, "net3-l0 tiny"), Shape(8, 64, 1, "net3-l3 tiny"), Shape(64, 64, 128, "llm-up tiny"),
    Shape(64, 128, 64, "llm-down tiny"), Shape(1, 64, 64, "decode tiny"), Shape(16, 64, 64, "decode tiny"),
)

#: Training-step cases of the memory suite besides Net3: (shape, activation, phase).
CUDA_MEMORY_LAYERS = ((Shape(8192, 4096, 14336, "llm-up"), "gelu_tanh", "fwd+bwd"),
                      (Shape(8192, 4096, 14336, "llm-up"), "gelu_tanh", "fwd+bwd-frozenW"))
CPU_MEMORY_LAYERS = ((Shape(64, 64, 128, "llm-up tiny"), "gelu_tanh", "fwd+bwd"),)

CPU_LABEL = "cpu-interpreter, tiny shapes, correctness only"
CPU_TIMING_NOTE = "cpu-interpreter (not a performance figure)"


@dataclasses.dataclass
class Plan:
    """Everything a run does; built by ``make_plan`` and narrowed by CLI options."""

    device: str                      # "cuda" | "cpu"
    quick: bool
    suites: tuple
    dtypes: tuple                    # torch dtypes, layers suite
    net3_dtypes: tuple               # torch dtypes, modes and memory suites
    activations: tuple               # names from ACTIVATIONS
    phases: tuple                    # names from PHASES
    impls: tuple                     # names from IMPLS
    shapes: tuple                    # Shape, layers suite
    net3: Net3                       # modes suite and memory suite
    memory_layers: tuple             # (Shape, activation, phase), memory suite
    rounds: int                      # interleaved rounds per case (median of the round medians)
    rep_ms: float                    # do_bench rep per implementation per round (CUDA)
    label: str                       # printed with every table and plot
    skipped_impls: dict = dataclasses.field(default_factory=dict)  # impl -> reason (whole run)
    plant_mismatch: bool = False     # test hook: add a deliberately wrong implementation
    seed: int = 0

    @property
    def is_performance_run(self):
        """False on CPU: interpreted kernels vs native eager — the times say nothing about speed."""
        return self.device == "cuda"


def make_plan(device, quick):
    """The preset for a device ("cuda" / "cpu") and ``--quick``; see the module docstring."""
    if device == "cuda":
        if quick:  # meant for under three minutes on an H100/H200 (most of it torch.compile and autotuning)
            bf16 = (torch.bfloat16,)
            return Plan(device, quick, SUITES, bf16, bf16, ("gelu_tanh",), PHASES, IMPLS,
                        (CUDA_SHAPES[0],), SEED_NET3, (), rounds=3, rep_ms=10.0,
                        label="cuda quick: seed Net3 + one Net3 layer, bf16")
        all3 = (torch.bfloat16, torch.float16, torch.float32)
        return Plan(device, quick, SUITES, all3, all3, ("none", "gelu_tanh", "relu"), PHASES, IMPLS, CUDA_SHAPES,
                    SEED_NET3, CUDA_MEMORY_LAYERS, rounds=5, rep_ms=25.0, label="cuda full")
    # Net3 on CPU in fp32 and bf16. (Triton 3.9's interpreter casts fp32 -> bf16 by truncation; the
    # kernels round to nearest-even by hand there — kernels/gemm.py _cast — so bf16 matches the GPU.)
    skipped = {"cublaslt": "CUDA only"}
    fp32_bf16 = (torch.float32, torch.bfloat16)
    if quick:
        skipped["compile"] = "skipped: cpu quick"
        return Plan(device, quick, SUITES, fp32_bf16, fp32_bf16, ("none", "gelu_tanh"), PHASES,
                    ("eager", "fusedad"), CPU_SHAPES[:1], TINY_NET3, (), rounds=2, rep_ms=0.0,
                    label=CPU_LABEL, skipped_impls=skipped)
    return Plan(device, quick, SUITES, (torch.float32, torch.bfloat16, torch.float16), fp32_bf16,
                ("none", "gelu_tanh", "relu"), PHASES, ("eager", "fusedad", "compile"), CPU_SHAPES, TINY_NET3,
                CPU_MEMORY_LAYERS, rounds=3, rep_ms=0.0, label=CPU_LABEL, skipped_impls=skipped)
