"""What mapgen accepts as input: the cost limits that keep every bad input from hanging a build,
a verification, an explanation or a conversion.

Each limit sits far above what real models need (the largest checked-in targets: DeepSeek-V3,
61 layers x 256 routed experts in 58 layers, 30,486 Megatron parameters, a 7.8 KB spec and a
1.7 KB config; Qwen3-235B-A22B, 94 layers x 128 experts) and far below what would take minutes
or gigabytes. An input beyond one is refused with a message naming the input and the limit; no
limit is ever applied silently.
"""

from __future__ import annotations

# Input files (spec, config.json, specs/targets.yaml): regular files of at most this size
# (the YAML reader takes about 7 s per MiB).
MAX_INPUT_BYTES = 1 << 20

# YAML (specs, targets) and JSON (configs): how deeply values nest, and how many values a YAML
# document may expand to once its aliases are followed (a "billion laughs" document is a few
# lines that expand to billions). Aliases that refer to themselves are refused outright.
MAX_NESTING = 64
MAX_YAML_VALUES = 100_000

# A spec: rules (each is matched against every Megatron parameter), ignore_hf entries (each is
# compared with every HF tensor), the length of a name pattern and its `**` wildcards (two
# `**` in one pattern already backtrack quadratically on a name that does not match).
MAX_RULES = 1_000
MAX_IGNORE_HF = 100
MAX_PATTERN_CHARS = 500
MAX_DOUBLE_STARS = 2

# Expressions (dims, when, config_fields values, ignore_hf prefixes): source length, nesting,
# evaluation steps, and the size of every value they compute.
MAX_EXPR_CHARS = 2_000
MAX_EXPR_DEPTH = 50
MAX_EXPR_STEPS = 1_000_000
MAX_EXPR_STRING = 10_000  # characters of a string result (repetition, concatenation, % formatting)
MAX_EXPR_LIST = 100_000  # elements of a list result (range, repetition, comprehension)
MAX_EXPR_INT_BITS = 128  # an integer result, in bits (sizes and indices need 63)
MAX_FORMAT_WIDTH = 100  # a width or precision in '%' formatting

# The model: every layer and expert gets functions of its own, so the module grows with
# layers x experts. Measured (2-core machine): a 4,096-layer Llama-3.2-1B is a 28 MB module,
# built in 18 s with a 2.2 GB peak; DeepSeek-V3's 14,848 expert-layers (58 x 256) are 36.8 MB,
# 15 s, 2.7 GB, so the expert-layer limit stands for about 80 MB, a minute and 6 GB. Kimi-K2
# (60 x 384 = 23,040) fits.
MAX_LAYERS = 4_096
MAX_EXPERTS = 4_096
MAX_EXPERT_LAYERS = 32_768  # experts x layers with experts

# Parallel layouts (verify, explain, convert, the shard map; mapgen.common.parallel checks them):
# the world size tp x pp x dp and each size in it (tp, pp, ep, expert-TP, dp). The largest
# training jobs run on about 100,000 accelerators; the shard map numbers every global rank with
# megatron-core's RankGenerator, which takes about 15 s for 131,072 ranks and a minute for 10**6
# (2-core machine).
MAX_WORLD_SIZE = 1 << 17
# Virtual pipeline stages per rank: each holds at least one layer.
MAX_VIRTUAL_STAGES = MAX_LAYERS
# Processes `mapgen verify` and `mapgen convert` start on one machine (torchrun starts more).
MAX_SPAWNED = 64
# Megatron-LM's --make-vocab-size-divisible-by (its default: 128). The vocabulary is padded to a
# multiple of it x TP, so each rank's vocabulary shard gains up to this many zero rows, which
# convert allocates and writes (hidden 16,384 in float32: 1 GiB a rank at the limit).
MAX_VOCAB_DIVISIBLE_BY = 1 << 14

