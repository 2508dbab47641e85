"""Import stand-in for NVIDIA TransformerEngine, for benchmarking Megatron-Bridge on CPU.

This is NOT TransformerEngine and computes nothing. The docstring of ``transformer_engine.pytorch`` says exactly what is stubbed and why.
"""

__version__ = "0.0.0+standin"
STANDIN = True

from transformer_engine import pytorch  # noqa: E402,F401
