"""Verification: checks a built module against independent truths (transformers' forward pass,
megatron-core's forward pass, the bytes of the original checkpoint) on spawned gloo ranks.

`jobs` is `mapgen verify` (its inputs checked first: `inputs`; the ranks started by `processes`;
the forward passes in `forward`, on CPU by `megatron_cpu`; the verdict in `verdict`; LLaVA's
check in `llava`). The tiny stand-in models that `mapgen verify`, `mapgen standin`, the tests and
the benchmarks share are `testing` (LLaVA's: `llava_standin`; the published vision-language
layout: `published`). It drives the runtime; it reads a module's spec and config and builds
megatron-core models with the compiler's readers, and the compiler never imports it."""
