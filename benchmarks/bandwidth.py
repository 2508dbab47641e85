"""Single-process import and export of a model with large tensors, as a fraction of plain torch
copy bandwidth on the same bytes.

Run: .venv/bin/python benchmarks/bandwidth.py [--layers 8] [--json out.json]
The model is a Llama with hidden 2048, FFN 8192, 16 heads / 4 KV heads, vocab 32768, fp32
(8 layers: 626M parameters, 2.5 GB). Baseline: `dst.copy_(src)` for tensors of every parameter's
shape, RAM to RAM. Import reads the safetensors file from the page cache (warmed by a first run).
Times are the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mapgen.verify import megatron_cpu, testing  # noqa: E402
from mapgen.compiler.build import compile_target  # noqa: E402
from mapgen.compiler.gpt_model import build_gpt_model  # noqa: E402
from mapgen.compiler.parallel_state import ensure_single_process_parallel_state  # noqa: E402
from mapgen.runtime.drivers import export_hf_tensors, load_hf_checkpoint  # noqa: E402


def best(repeat: int, work: object) -> float:
    assert callable(work)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        hf_dir = Path(folder)
        config = testing.tiny_hf_config(
            "llama", hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_attention_heads=16,
            num_key_value_heads=4, num_hidden_layers=args.layers, vocab_size=16 * args.hidden,
        )
        model = testing.save_random_model(config, hf_dir)
        del model
        module_path = hf_dir / "mapping.py"
        module_path.write_text(compile_target("mapping", ROOT / "specs/llama.yaml", hf_dir / "config.json", "local", "bench"))
        module = testing.import_module_from_path(module_path)
        ensure_single_process_parallel_state()
        megatron_cpu.prepare_cpu_megatron()
        megatron = build_gpt_model(module.DIMS, params_dtype=torch.float32)
        params = list(megatron.parameters())
        nbytes = sum(p.numel() * p.element_size() for p in params)
        sources = [torch.randn_like(p) for p in params]

        def copy_all() -> None:
            with torch.no_grad():
                for param, source in zip(params, sources):
                    param.copy_(source)

        def import_all() -> None:
            load_hf_checkpoint(module, [megatron], hf_dir)

        def export_all() -> None:
            for _name, tensor in export_hf_tensors(module, [megatron]):
                tensor.contiguous()

        copy_all()
        import_all()  # warms the page cache
        copy_s = best(args.repeat, copy_all)
        del sources
        import_s = best(args.repeat, import_all)
        export_s = best(args.repeat, export_all)
    gb = nbytes / 1e9
    row = {
        "layers": args.layers,
        "params": sum(p.numel() for p in params),
        "gb": round(gb, 3),
        "copy_s": round(copy_s, 6),
        "import_s": round(import_s, 6),
        "export_s": round(export_s, 6),
        "copy_gb_s": round(gb / copy_s, 2),
        "import_gb_s": round(gb / import_s, 2),
        "export_gb_s": round(gb / export_s, 2),
        "import_vs_copy": round(copy_s / import_s, 3),
        "export_vs_copy": round(copy_s / export_s, 3),
    }
    print(f"{row['params'] / 1e6:.0f}M parameters, {gb:.2f} GB fp32")
    print(f"{'':<8} {'seconds':>8} {'GB/s':>7} {'vs copy':>8}")
    print(f"{'copy':<8} {copy_s:>8.3f} {row['copy_gb_s']:>7.2f} {1:>8.2f}")
    print(f"{'import':<8} {import_s:>8.3f} {row['import_gb_s']:>7.2f} {row['import_vs_copy']:>8.2f}")
    print(f"{'export':<8} {export_s:>8.3f} {row['export_gb_s']:>7.2f} {row['export_vs_copy']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
