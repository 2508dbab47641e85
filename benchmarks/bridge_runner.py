"""Time Megatron-Bridge 0.3.1's HF->Megatron import and Megatron->HF export on CPU/gloo.

Run (after `bash benchmarks/bridge_setup.sh`; no torchrun):

    .venv-bench/bin/python benchmarks/bridge_runner.py HF_DIR --tp N --pp N --repeat R

It starts tp*pp processes (torch.multiprocessing, gloo, 127.0.0.1, a free port, one torch
thread each, as mapgen's own benchmark does).  Each process initialises megatron-core's
parallel_state, builds its pipeline stage of a megatron-core GPTModel with the *local* layer spec
(matching the HF config: RMSNorm, SiLU, gated MLP, no linear biases, GQA), and then R times:

- import: `AutoBridge.load_hf_weights(model, HF_DIR)` (reads the safetensors files, converts and
  distributes every parameter);
- export: iterates the whole `AutoBridge.export_hf_weights(model, cpu=True)` generator, keeping
  every yielded tensor.

A time is the slowest rank's in a repeat, best over repeats (barrier before each timed phase).
Rank 0 then compares every exported tensor with the checkpoint's safetensors bytes and counts
mismatches (missing, extra, shape/dtype/value differences); they are reported, not fatal.
stdout gets exactly one JSON line:

    {"import_s": ..., "export_s": ..., "tensors": N, "mismatched": M, "layout": "tp1pp1"}

everything else (warnings, logs, details of mismatches) goes to stderr.

What is changed around Bridge, and why (nothing in Bridge's or megatron-core's files is edited):

1. TransformerEngine stand-in (benchmarks/te_standin/): Bridge imports `transformer_engine`
   unconditionally; the stand-in provides the names it needs, and te_gate keeps megatron-core's
   own import-time TE probes seeing "no TE" (so the model is exactly the local-spec model that
   megatron-core builds on a machine without TE).  See their docstrings.
2. CPU megatron-core: `torch.cuda.current_device` returns "cpu", the model-parallel RNG tracker
   is seeded with `model_parallel_cuda_manual_seed(..., force_reset_rng=True)` and, for tied
   embeddings under PP, `Tensor.cuda` is the identity.
3. gloo scatter of non-contiguous tensors (Bridge bug, see shared/peers.md): at TP>1 Bridge's
   RowParallelMapping scatters `torch.chunk(w, tp, dim=1)` views; gloo's scatter sends those
   views' underlying storage bytes, not the view's elements, so ranks get wrong weights silently.
   `torch.distributed.scatter` is wrapped to pass `.contiguous()` copies of the `scatter_list`
   entries (what NCCL users effectively get), so Bridge computes correct weights; the copies
   are part of the timed import.  `--no-scatter-fix` turns this off to reproduce the bug.
4. Config: the checkpoint's config.json written by transformers 5 has `rope_parameters`;
   transformers 4 (which Bridge 0.3.1 requires) reads `rope_theta`/`rope_scaling`.  The runner
   passes Bridge a sanitized copy of the folder (config.json rewritten with both fields,
   model files symlinked); the tensors are the same files.  Only RoPE settings differ, which
   weight conversion does not use.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "te_standin"))
import te_gate  # noqa: E402

te_gate.install()  # before anything imports megatron (also in the spawned processes)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- HF folder


def sanitized_hf_dir(hf_dir: Path, into: Path) -> Path:
    """A copy of `hf_dir` whose config.json transformers 4 reads as written (see docstring 4)."""
    config = json.loads((hf_dir / "config.json").read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", scaling)
        del config["rope_parameters"]
    into.mkdir(parents=True, exist_ok=True)
    for entry in hf_dir.iterdir():
        if entry.name != "config.json":
            (into / entry.name).symlink_to(entry.resolve())
    (into / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return into


def checkpoint_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


# ---------------------------------------------------------------------------- CPU / gloo shims


def prepare_cpu_megatron() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    mrandom.model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True, force_reset_rng=True)


def install_contiguous_scatter() -> None:
    """Docstring point 3: gloo scatter with non-contiguous scatter_list entries."""
    original = dist.scatter

    def scatter(tensor: torch.Tensor, scatter_list: list[torch.Tensor] | None = None, *args: Any, **kwargs: Any) -> Any:
        if scatter_list is not None:
            scatter_list = [t if t.is_contiguous() else t.contiguous() for t in scatter_list]
        return original(tensor, scatter_list, *args, **kwargs)

    dist.scatter = scatter  # Bridge calls torch.distributed.scatter(...) through the module


# ---------------------------------------------------------------------------- model


def build_model_chunk(hf_config: dict[str, Any], tp: int, pp: int) -> Any:
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    if hf_config.get("hidden_act", "silu") != "silu":
        raise SystemExit(f"only silu Llama models are supported, got {hf_config.get('hidden_act')}")
    heads = hf_config["num_attention_heads"]
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    config = TransformerConfig(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        ffn_hidden_size=hf_config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads", heads),
        kv_channels=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        layernorm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
        normalization="RMSNorm",
        activation_func=torch.nn.functional.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        add_qkv_bias=bool(hf_config.get("attention_bias", False)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        sequence_parallel=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPTModel(
            config,
            get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=hf_config["vocab_size"],
            max_sequence_length=hf_config.get("max_position_embeddings", 4096),
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=bool(hf_config.get("tie_word_embeddings", False)),
            position_embedding_type="rope",
            rotary_base=rope_theta,
            rope_scaling=rope.get("rope_type") == "llama3",
            rope_scaling_factor=rope.get("factor", 8.0),
            parallel_output=False,
        )


# ---------------------------------------------------------------------------- one process


def compare(exported: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    problems = [f"missing from export: {name}" for name in reference if name not in exported]
    for name, tensor in exported.items():
        want = reference.get(name)
        if want is None:
            problems.append(f"not in checkpoint: {name}")
        elif tensor.shape != want.shape or tensor.dtype != want.dtype:
            problems.append(f"{name}: {tuple(tensor.shape)} {tensor.dtype} != {tuple(want.shape)} {want.dtype}")
        elif not torch.equal(tensor.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)):
            problems.append(f"{name}: values differ (max abs diff {(tensor - want).abs().max().item():.3g})")
    return problems


def worker(rank: int, world: int, port: int, args: argparse.Namespace, bridge_dir: str, results: Any) -> None:
    os.dup2(2, 1)  # stdout of this process (and of anything it calls) goes to stderr
    sys.stdout = sys.stderr
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                                 pipeline_model_parallel_size=args.pp)
        prepare_cpu_megatron()
        if not args.no_scatter_fix:
            install_contiguous_scatter()

        from megatron.bridge import AutoBridge

        flagged = te_gate.megatron_core_te_flags()
        if flagged:
            raise RuntimeError(f"megatron-core modules saw the TE stand-in: {flagged}")

        hf_config = json.loads((Path(args.hf_dir) / "config.json").read_text())
        chunks = [build_model_chunk(hf_config, args.tp, args.pp)]
        bridge = AutoBridge.from_hf_pretrained(bridge_dir)

        import_times, export_times = [], []
        exported: dict[str, torch.Tensor] = {}
        for _ in range(args.repeat):
            dist.barrier()
            started = time.perf_counter()
            bridge.load_hf_weights(chunks, bridge_dir)
            import_times.append(time.perf_counter() - started)
            dist.barrier()
            exported = {}
            started = time.perf_counter()
            for name, tensor in bridge.export_hf_weights(chunks, cpu=True, show_progress=False):
                exported[name] = tensor
            export_times.append(time.perf_counter() - started)

        all_times: list[Any] = [None] * world
        dist.all_gather_object(all_times, (import_times, export_times))
        result: dict[str, Any] = {}
        if rank == 0:
            import_s = min(max(times[0][r] for times in all_times) for r in range(args.repeat))
            export_s = min(max(times[1][r] for times in all_times) for r in range(args.repeat))
            problems = compare(exported, checkpoint_tensors(Path(args.hf_dir)))
            for problem in problems[:20]:
                log(f"mismatch: {problem}")
            if len(problems) > 20:
                log(f"... and {len(problems) - 20} more mismatches")
            result = {
                "import_s": round(import_s, 4),
                "export_s": round(export_s, 4),
                "tensors": len(exported),
                "mismatched": len(problems),
                "layout": f"tp{args.tp}pp{args.pp}",
            }
            if args.verbose:
                log("per-rank times (import, export):", all_times)
        results.put((rank, result, None))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
        raise


# ---------------------------------------------------------------------------- main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the processes are killed")
    parser.add_argument("--no-scatter-fix", action="store_true", help="keep Bridge's gloo scatter bug (TP>1)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    args.hf_dir = args.hf_dir.resolve()

    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    world = args.tp * args.pp
    with tempfile.TemporaryDirectory(prefix="bridge_hf_") as tmp:
        bridge_dir = str(sanitized_hf_dir(args.hf_dir, Path(tmp) / "hf"))
        context = mp.get_context("spawn")
        results = context.Queue()
        processes = mp.start_processes(worker, args=(world, free_port(), args, bridge_dir, results), nprocs=world,
                                       join=False, start_method="spawn")
        collected: dict[int, Any] = {}
        deadline = time.monotonic() + args.timeout
        failure = None
        try:
            import queue

            while len(collected) < world:
                try:
                    rank, result, error = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [p.exitcode for p in processes.processes if p.exitcode not in (None, 0)]
                    if dead or time.monotonic() > deadline:
                        failure = f"exit codes {dead}" if dead else f"no result after {args.timeout:.0f} s"
                        break
                    continue
                if error:
                    failure = f"rank {rank} failed:\n{error}"
                    break
                collected[rank] = result
            if failure is None:
                while not processes.join(timeout=args.timeout):
                    pass
        finally:
            for process in processes.processes:
                if process.is_alive():
                    process.kill()
    if failure is not None:
        log(f"bridge_runner: {failure}")
        return 1
    stdout.write(json.dumps(collected[0]) + "\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
