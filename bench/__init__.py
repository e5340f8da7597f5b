"""``python -m bench`` — fusedad vs eager PyTorch, cuBLASLt epilogues and torch.compile.

Not shipped in the wheel. Importing this package imports nothing heavy (no torch, no fusedad), so
``bench/cli.py`` can set ``TRITON_INTERPRET=1`` before fusedad is imported on a machine without CUDA.
A suite is one module in ``suites/``; ``docs/benchmark-and-gpu-protocol.md`` describes every file.
"""
