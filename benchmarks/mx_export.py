"""Export time and bytes moved of the quantized export formats (FP8 128x128, MXFP8, NVFP4)
against a bf16 export, for a Llama-3.2-1B-width model (hidden 2048, FFN 8192, 32 query and 8 KV
heads; 2 layers and a 4096-token vocabulary by default, so that the linear layers, which are
what is quantized, dominate), in one process on CPU. Printed as ratios; nothing is asserted.

Run: .venv/bin/python benchmarks/mx_export.py [--layers N] [--vocab V] [--repeats R] [--json out.json]

The model is megatron-core's (local layer spec), built in float32 with random weights (the
quantized weights are computed from its float32 values, the rest cast to bf16); one
held Converter exports once to warm up (the agreement and the plans are made), then `repeats`
times per format, the consumer dropping each tensor as it comes; the best time is reported.
Bytes are what the export yields (every tensor's nbytes: the weights, their scale companions and
the unquantized tensors), which is what a weight sync moves to the engine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORMATS: dict[str, dict[str, Any]] = {
    "bf16": {"dtype": "bfloat16"},
    "fp8 128x128": {"dtype": "bfloat16", "fp8": True},
    "mxfp8": {"dtype": "bfloat16", "mxfp8": True},
    "nvfp4": {"dtype": "bfloat16", "nvfp4": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    import mapgen
    from mapgen.compiler.build import compile_target
    from mapgen.compiler.gpt_model import build_gpt_model
    from mapgen.compiler.parallel_state import ensure_single_process_parallel_state
    from mapgen.verify import megatron_cpu, testing

    mapgen.quiet()
    ensure_single_process_parallel_state()
    megatron_cpu.prepare_cpu_megatron()
    config = json.loads((ROOT / "specs" / "configs" / "llama3_2_1b.json").read_text())
    config.update(num_hidden_layers=args.layers, vocab_size=args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(config))
        path = folder / "llama_bench.py"
        path.write_text(compile_target("llama_bench", ROOT / "specs" / "llama.yaml", folder / "config.json", "local", "bench"))
        module = testing.import_module_from_path(path, "llama_mx_bench")
    model = build_gpt_model(module.DIMS, params_dtype=torch.float32).eval()
    converter = mapgen.converter(module, [model])
    rows: dict[str, dict[str, float]] = {}
    for label, options in FORMATS.items():
        for _ in converter.export(**options):  # warm-up: agreement and plans
            pass
        best = float("inf")
        moved = 0
        for _ in range(args.repeats):
            moved = 0
            start = time.perf_counter()
            for _, tensor in converter.export(**options):
                moved += tensor.numel() * tensor.element_size()
            best = min(best, time.perf_counter() - start)
        rows[label] = {"seconds": best, "bytes": moved}
    base = rows["bf16"]
    params = sum(p.numel() for p in model.parameters())
    print(f"Llama-3.2-1B widths, {args.layers} layers, vocabulary {args.vocab}: {params / 1e6:.0f} M parameters, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'format':<14}{'time s':>9}{'x bf16':>9}{'MB moved':>11}{'x bf16':>9}")
    for label, row in rows.items():
        print(f"{label:<14}{row['seconds']:>9.3f}{row['seconds'] / base['seconds']:>9.2f}"
              f"{row['bytes'] / 1e6:>11.1f}{row['bytes'] / base['bytes']:>9.3f}")
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "vocab": args.vocab, "parameters": params, "formats": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
