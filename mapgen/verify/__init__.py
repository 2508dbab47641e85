"""Verification: checks a built module against independent truths (transformers' forward pass,
megatron-core's forward pass, the bytes of the original checkpoint) on spawned gloo ranks
(`jobs`), and the tiny stand-in models and oracles that `mapgen verify`, `mapgen standin`, the
tests and the benchmarks share (`testing`). It drives the runtime; it reads a module's spec and
config and builds megatron-core models with the compiler's readers, and the compiler never
imports it."""
