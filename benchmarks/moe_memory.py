"""Peak memory of importing a DeepSeek-V3 stand-in of full depth and full expert count (61
layers, 256 experts, the first 3 dense) with tiny dimensions, so that what is measured is the
conversion's own bookkeeping over ~30k parameters, not the weights.

Run: .venv/bin/python benchmarks/moe_memory.py [--json out.json] [--layers N --experts E]
Baseline, in the same process: safetensors' own `load_file` of the same checkpoint (every
tensor read into memory at once). Memory is the process's resident set, sampled every 5 ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        import os

        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_above_start(work: Callable[[], Any]) -> tuple[Any, int, float]:
    """(work's result, peak resident bytes above the start, seconds)."""
    start = _rss()
    peak = start
    running = True

    def sample() -> None:
        nonlocal peak
        while running:
            peak = max(peak, _rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        result = work()
    finally:
        running = False
        sampler.join()
    return result, max(peak, _rss()) - start, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--experts", type=int, default=256)
    args = parser.parse_args()
    from tables import run_metadata  # noqa: PLC0415

    meta = run_metadata()  # date, machine and load at the start: docs/benchmarks.md prints them

    import torch
    import transformers
    from safetensors.torch import load_file

    from mapgen.compiler.build import compile_target
    from mapgen.compiler.gpt_model import build_gpt_model
    from mapgen.compiler.parallel_state import ensure_single_process_parallel_state
    from mapgen.runtime.drivers import load_hf_checkpoint
    from mapgen.verify.megatron_cpu import prepare_cpu_megatron
    from mapgen.verify.testing import import_module_from_path, save_random_model

    fields = json.loads((ROOT / "specs/configs/deepseek_v3.json").read_text())
    tiny = {k: v for k, v in fields.items() if k not in ("quantization_config", "auto_map", "torch_dtype")}
    tiny.update(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, vocab_size=128, num_hidden_layers=args.layers,
        n_routed_experts=args.experts, dtype="float32",
        num_nextn_predict_layers=0,  # the main model only, as these figures were first measured
    )
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        hf_dir = Path(folder) / "hf"
        config = transformers.AutoConfig.for_model(tiny.pop("model_type"), **tiny)
        t = time.perf_counter()
        save_random_model(config, hf_dir)
        print(f"stand-in saved: {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        source = compile_target("deepseek_standin", ROOT / "specs/deepseek_v3.yaml", hf_dir / "config.json", "local", "bench")
        module_path = Path(folder) / "deepseek_standin.py"
        module_path.write_text(source)
        module = import_module_from_path(module_path)
        print(f"module built and imported: {time.perf_counter() - t:.1f} s, {len(module.PARAMS)} parameters", flush=True)
        ensure_single_process_parallel_state()
        prepare_cpu_megatron()
        t = time.perf_counter()
        model = build_gpt_model(module.DIMS, params_dtype=torch.float32)
        print(f"megatron-core model built: {time.perf_counter() - t:.1f} s", flush=True)
        checkpoint_bytes = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))

        loaded, ours, ours_s = peak_above_start(lambda: load_hf_checkpoint(module, [model], hf_dir))
        state, theirs, theirs_s = peak_above_start(
            lambda: {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
        )
        assert loaded == len(module.PARAMS) and len(state) == len(module.HF_TENSORS)
    row = {
        "layers": args.layers,
        "experts": args.experts,
        "megatron_params": len(module.PARAMS),
        "hf_tensors": len(module.HF_TENSORS),
        "checkpoint_mib": round(checkpoint_bytes / 2**20, 1),
        "import_peak_mib": round(ours / 2**20, 1),
        "import_s": round(ours_s, 2),
        "load_file_peak_mib": round(theirs / 2**20, 1),
        "load_file_s": round(theirs_s, 2),
    }
    print(
        f"import through the module: peak +{row['import_peak_mib']} MiB in {row['import_s']} s; "
        f"safetensors load_file of the same {row['checkpoint_mib']} MiB checkpoint: "
        f"+{row['load_file_peak_mib']} MiB in {row['load_file_s']} s "
        f"(ratio {ours / max(theirs, 1):.2f}x memory, {ours_s / theirs_s:.2f}x time)"
    )
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, **row}, indent=2) + "\n")


if __name__ == "__main__":
    main()
