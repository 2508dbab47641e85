"""Time Megatron-Bridge's HF->Megatron import and Megatron->HF export on CPU/gloo, for
Bridge 0.3.1 (.venv-bench: Python 3.11, megatron-core 0.16.1, transformers 4) and Bridge 0.6.2
(.venv-bench062: Python 3.12, megatron-core 0.19.2, transformers 5.12.1); the same file runs in
either venv.

Run (after `bash benchmarks/bridge_setup.sh`; no torchrun):

    .venv-bench/bin/python benchmarks/bridge_runner.py HF_DIR [HF_DIR ...] --tp N --pp N --ep N --repeat R
    .venv-bench062/bin/python benchmarks/bridge_runner.py HF_DIR [HF_DIR ...] ...

Models: a Llama (dense) or a Qwen3-MoE (experts as megatron-core's SequentialMLP, the local
layer spec's experts, as mapgen's benchmark builds them; --ep N spreads them over N ranks).
It starts tp*pp*ep processes (torch.multiprocessing, gloo, 127.0.0.1, a free port, one torch
thread each, as mapgen's own benchmark does).  Each process initialises megatron-core's
parallel_state, builds its pipeline stage of a megatron-core GPTModel with the *local* layer spec
(matching the HF config: RMSNorm, SiLU, gated MLP, no linear biases, GQA), and then R times:

- import: `AutoBridge.load_hf_weights(model, HF_DIR)` (reads the safetensors files, converts and
  distributes every parameter);
- export: iterates the whole `AutoBridge.export_hf_weights(model, cpu=True)` generator, keeping
  every yielded tensor; then again with `conversion_tasks=` the tasks of
  `AutoBridge.get_conversion_tasks(model)` made once before the first export ("held": Bridge's
  plan made once, as a held mapgen Converter holds its own), and, where Bridge has it (0.6.2),
  with `weight_dtype=torch.bfloat16` (compared with the checkpoint cast to bf16).

--dtype bf16 builds the model in bf16 (params_dtype, pipeline_dtype, bf16=True); --stream (real
widths, benchmarks/realwidth.py) keeps no exported tensor in the timed exports (each is dropped as
a weight-sync consumer would), runs no bf16-export phase, and checks one more, untimed export on
rank 0 tensor by tensor against the checkpoint instead; every phase's peak RSS per rank (VmHWM,
reset through /proc/self/clear_refs before it) and the mapped file pages (RssFile) are reported,
with every repeat's time (`times_s`) and the medians.

A time is the slowest rank's in a repeat, best over repeats (a barrier before each timed phase;
what is alive before the first is collected and frozen, gc.freeze, so that a phase pays for
collecting its own garbage only, as in mapgen's benchmark).
Rank 0 then compares every exported tensor of each kind of export with the checkpoint's
safetensors bytes and counts mismatches (missing, extra, shape/dtype/value differences); they
are reported, not fatal.  At EP > 1 every rank also checks its imported experts' linear_fc2
against the checkpoint's experts (`imported_expert_problems`).  An export that raises (Bridge
0.3.1 at EP > 1 with SequentialMLP experts) is reported as `export_error`.
stdout gets exactly one JSON line per checkpoint, in the order given:

    {"import_s": ..., "export_s": ..., "export_held_s": ..., "export_bf16_s": ... or null,
     "tensors": N, "mismatched": M, "layout": "tp1pp1ep1", "import_expert_mismatched": null,
     "bridge": "0.6.2", "megatron_core": "0.19.2", "transformers": "5.12.1", "python": "3.12.1"}

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
4. Config (Bridge 0.3.1 only): the checkpoint's config.json written by transformers 5 has
   `rope_parameters` and, for Qwen3-MoE, `num_local_experts`; transformers 4 (which Bridge 0.3.1
   requires) reads `rope_theta`/`rope_scaling` and `num_experts` (without it, 128 experts).  The
   runner passes Bridge 0.3.1 a sanitized copy of the folder (config.json rewritten with both
   spellings, model files symlinked); the tensors are the same files.  Bridge 0.6.2 runs on
   transformers 5 and gets the folder as written.
5. MoE on CPU: megatron-core's router names TransformerEngine's gating GEMM without importing
   it when TE is absent (`moe_utils.te_general_gemm`); it is set to None, megatron-core's own
   "no TE" value, as mapgen's CPU preparation does.  Nothing runs a forward pass here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- HF folder


def sanitized_hf_dir(hf_dir: Path, into: Path) -> Path:
    """A copy of `hf_dir` whose config.json transformers 4 reads as written (see docstring 4);
    `hf_dir` itself with transformers 5."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return hf_dir
    config = json.loads((hf_dir / "config.json").read_text())
    if "num_local_experts" in config and config.get("model_type") == "qwen3_moe":
        config.setdefault("num_experts", config["num_local_experts"])
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
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # docstring point 5
        moe_utils.te_general_gemm = None

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


def moe_config(hf_config: dict[str, Any], ep: int) -> dict[str, Any]:
    """megatron-core's MoE fields for a Qwen3-MoE config (every layer MoE, no shared expert),
    experts as SequentialMLP; {} for a dense model."""
    experts = hf_config.get("num_local_experts", hf_config.get("num_experts"))
    if hf_config.get("model_type") != "qwen3_moe":
        return {}
    if hf_config.get("mlp_only_layers") or hf_config.get("decoder_sparse_step", 1) != 1:
        raise SystemExit("only Qwen3-MoE models whose every layer is MoE are supported")
    return dict(
        num_moe_experts=experts,
        moe_ffn_hidden_size=hf_config["moe_intermediate_size"],
        moe_router_topk=hf_config["num_experts_per_tok"],
        moe_router_pre_softmax=not hf_config.get("norm_topk_prob", False),
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_router_dtype="fp32",
        expert_model_parallel_size=ep,
    )


def build_model_chunk(hf_config: dict[str, Any], tp: int, pp: int, ep: int = 1, dtype: torch.dtype = torch.float32) -> Any:
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    if hf_config.get("hidden_act", "silu") != "silu":
        raise SystemExit(f"only silu Llama models are supported, got {hf_config.get('hidden_act')}")
    heads = hf_config["num_attention_heads"]
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    moe = moe_config(hf_config, ep)
    qk_layernorm = hf_config.get("model_type") in ("qwen3", "qwen3_moe")
    config = TransformerConfig(
        **moe,
        qk_layernorm=qk_layernorm,
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
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        sequence_parallel=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPTModel(
            config,
            get_gpt_layer_local_spec(num_experts=moe.get("num_moe_experts"), moe_grouped_gemm=False,
                                     qk_layernorm=qk_layernorm, normalization="RMSNorm"),
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


def imported_expert_problems(chunks: list[Any], hf_dir: Path, hf_config: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """At EP > 1: each of this rank's experts' linear_fc2 (a plain copy of the HF expert's
    down_proj when TP is 1; a TP shard of its columns otherwise) against the checkpoint's bytes
    of the expert with the global index EP rank * local experts + local index, the placement
    megatron-core's SequentialMLP gives. An independent check of the import itself, which the
    export comparison cannot give when the export fails or maps experts back the same wrong way."""
    import re

    from megatron.core import parallel_state

    reference = checkpoint_tensors(hf_dir)
    experts = hf_config.get("num_local_experts", hf_config.get("num_experts"))
    local = experts // args.ep
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    problems = []
    pattern = re.compile(r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.linear_fc2\.weight$")
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            match = pattern.search(name)
            if match is None:
                continue
            layer = chunk.decoder.layers[int(match.group(1))].layer_number - 1
            hf_name = f"model.layers.{layer}.mlp.experts.{ep_rank * local + int(match.group(2))}.down_proj.weight"
            want = reference[hf_name].chunk(args.tp, dim=1)[tp_rank]
            if not torch.equal(param.detach().contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)):
                problems.append(f"{name} (EP rank {ep_rank}) != {hf_name}")
    return problems


def run_case(rank: int, world: int, args: argparse.Namespace, hf_dir: Path, bridge_dir: str) -> dict[str, Any]:
    """One checkpoint: the model built for it, --repeat imports and exports timed, rank 0's
    result (other ranks: {})."""
    from megatron.bridge import AutoBridge

    load = [round(x, 2) for x in os.getloadavg()]  # the machine's load at the start of the case
    hf_config = json.loads((hf_dir / "config.json").read_text())
    chunks = [build_model_chunk(hf_config, args.tp, args.pp, args.ep, DTYPES[args.dtype])]
    bridge = AutoBridge.from_hf_pretrained(bridge_dir)

    import inspect

    bf16 = "weight_dtype" in inspect.signature(bridge.export_hf_weights).parameters  # Bridge 0.6.2
    times: dict[str, list[float]] = {"import": [], "export": [], "export_held": [], "export_bf16": []}
    exported: dict[str, dict[str, torch.Tensor]] = {}
    export_error = None
    tasks = None
    # what is alive once everything is built is collected and frozen, so that no call pays for a full
    # collection over the model's building and the libraries' objects, only for its own garbage (as
    # mapgen's benchmark does)
    gc.collect()
    gc.freeze()
    peaks: dict[str, float] = {}
    for _ in range(args.repeat):
        dist.barrier()
        reset_peak()
        started = time.perf_counter()
        bridge.load_hf_weights(chunks, bridge_dir)
        times["import"].append(time.perf_counter() - started)
        peaks["import"] = max(peaks.get("import", 0.0), peak_mib())
        peaks["import_file"] = max(peaks.get("import_file", 0.0), peak_mib("RssFile"))
        try:
            # fresh: what export_hf_weights does when called; held: the conversion tasks
            # (Bridge's plan) made once beforehand and passed in, as a weight-sync loop may
            if tasks is None:
                tasks = bridge.get_conversion_tasks(chunks)
            phases: list[tuple[str, dict[str, Any]]] = [("export", {}), ("export_held", {"conversion_tasks": tasks})]
            if bf16 and not args.stream:
                phases.append(("export_bf16", {"weight_dtype": torch.bfloat16}))
            for phase, options in phases:
                dist.barrier()
                reset_peak()
                exported[phase] = {}
                started = time.perf_counter()
                for name, tensor in bridge.export_hf_weights(chunks, cpu=True, show_progress=False, **options):
                    if not args.stream:  # --stream: each tensor dropped as a weight-sync consumer would
                        exported[phase][name] = tensor
                times[phase].append(time.perf_counter() - started)
                peaks[phase] = max(peaks.get(phase, 0.0), peak_mib())
                peaks[phase + "_file"] = max(peaks.get(phase + "_file", 0.0), peak_mib("RssFile"))
        except Exception as error:  # noqa: BLE001 - reported (Bridge 0.3.1 at EP > 1)
            export_error = f"{type(error).__name__}: {error}"
            log(f"rank {rank}: export failed:\n{traceback.format_exc()}")
            break
    expert_problems = imported_expert_problems(chunks, hf_dir, hf_config, args) if args.ep > 1 else []
    streamed = None
    if args.stream and export_error is None:  # one untimed export, checked tensor by tensor on rank 0
        streamed = stream_check(bridge, chunks, hf_dir, rank)

    all_times: list[Any] = [None] * world
    dist.all_gather_object(all_times, (times, export_error, expert_problems, {k: round(v) for k, v in peaks.items()}))
    result: dict[str, Any] = {}
    if rank == 0:

        def best(phase: str) -> float | None:
            runs = min(len(t[0][phase]) for t in all_times)
            return round(min(max(t[0][phase][r] for t in all_times) for r in range(runs)), 4) if runs else None

        def median(phase: str) -> float | None:
            runs = min(len(t[0][phase]) for t in all_times)
            return round(statistics.median(max(t[0][phase][r] for t in all_times) for r in range(runs)), 4) if runs else None

        errors = sorted({t[1] for t in all_times if t[1]})
        result = {
            "times_s": {phase: [round(max(t[0][phase][r] for t in all_times), 4)
                                for r in range(min(len(t[0][phase]) for t in all_times))] for phase in times},
            "import_median_s": median("import"), "export_median_s": median("export"),
            "export_held_median_s": median("export_held"),
            "peak_rss_mib": [t[3] for t in all_times],
            "import_s": best("import"),
            "import_first_s": round(max(t[0]["import"][0] for t in all_times), 4),
            "layout": f"tp{args.tp}pp{args.pp}ep{args.ep}",
            "import_expert_mismatched": sum(len(t[2]) for t in all_times) if args.ep > 1 else None,
        } | versions()
        for t in all_times:
            for problem in t[2][:5]:
                log(f"import mismatch: {problem}")
        if args.stream and not errors:
            result |= {"export_s": best("export"), "export_held_s": best("export_held"), "export_bf16_s": None,
                       "tensors": streamed["tensors"], "mismatched": streamed["mismatched"],
                       "mismatched_per_export": {"export (untimed pass)": streamed["mismatched"]},
                       "exported_in_other_dtype": streamed["other_dtype"]}
        elif errors:
            result |= {"export_s": None, "export_held_s": None, "export_bf16_s": None, "export_error": errors[0],
                       "tensors": 0, "mismatched": None}
        else:
            reference = checkpoint_tensors(hf_dir)
            mismatched = {}
            for phase, tensors in exported.items():
                want = reference
                if phase == "export_bf16":
                    want = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in reference.items()}
                problems = compare(tensors, want)
                for problem in problems[:20]:
                    log(f"{phase} mismatch: {problem}")
                if len(problems) > 20:
                    log(f"... and {len(problems) - 20} more mismatches")
                mismatched[phase] = len(problems)
            result |= {"export_s": best("export"), "export_held_s": best("export_held"),
                       "export_bf16_s": best("export_bf16"), "tensors": len(exported["export"]),
                       "mismatched": sum(mismatched.values()), "mismatched_per_export": mismatched}
        if args.verbose:
            log("per-rank times:", all_times)
    if result:
        result |= {"hf_dir": str(hf_dir), "load_at_start": load}
    del chunks
    return result


def peak_mib(field: str = "VmHWM") -> float:
    """This process's peak RSS (VmHWM) in MiB since the last reset_peak(); or another field of
    /proc/self/status now (RssFile: file pages mapped, such as a checkpoint's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
    except OSError:
        pass


def stream_check(bridge: Any, chunks: list[Any], hf_dir: Path, rank: int) -> dict[str, int] | None:
    """--stream: one more (untimed) export, each tensor compared on rank 0 with the checkpoint's
    bytes as it comes and then dropped, so that no rank holds a second copy of the model."""
    from safetensors import safe_open

    files: dict[str, Any] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        handle = safe_open(str(file), "pt")
        files |= {name: handle for name in handle.keys()}
    seen, problems, other_dtype = set(), 0, 0
    for name, tensor in bridge.export_hf_weights(chunks, cpu=True, show_progress=False):
        if rank != 0:
            continue
        seen.add(name)
        if name not in files:
            problems += 1
            continue
        want = files[name].get_tensor(name)
        if tensor.dtype != want.dtype and tensor.shape == want.shape and torch.equal(tensor.to(want.dtype), want):
            other_dtype += 1  # the same values in another dtype (megatron-core keeps some params in float32)
            log(f"stream: {name} exported as {tensor.dtype}, the checkpoint's {want.dtype}, same values")
        elif tensor.shape != want.shape or tensor.dtype != want.dtype or not torch.equal(tensor, want):
            problems += 1
            if problems <= 5:
                log(f"stream mismatch: {name}: {tuple(tensor.shape)} {tensor.dtype} vs {tuple(want.shape)} {want.dtype}")
    if rank != 0:
        return None
    return {"tensors": len(seen), "mismatched": problems + len(set(files) - seen), "other_dtype": other_dtype}


def worker(rank: int, world: int, port: int, args: argparse.Namespace, bridge_dirs: list[str], results: Any) -> None:
    os.dup2(2, 1)  # stdout of this process (and of anything it calls) goes to stderr
    sys.stdout = sys.stderr
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                                 pipeline_model_parallel_size=args.pp,
                                                 expert_model_parallel_size=args.ep)
        prepare_cpu_megatron()
        if not args.no_scatter_fix:
            install_contiguous_scatter()

        from megatron.bridge import AutoBridge

        flagged = te_gate.megatron_core_te_flags()
        if flagged:
            raise RuntimeError(f"megatron-core modules saw the TE stand-in: {flagged}")

        collected = [run_case(rank, world, args, Path(hf_dir), bridge_dir)
                     for hf_dir, bridge_dir in zip(args.hf_dirs, bridge_dirs)]
        results.put((rank, collected, None))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
        raise


# ---------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    import platform
    from importlib.metadata import version

    return {"bridge": version("megatron-bridge"), "megatron_core": version("megatron-core"),
            "transformers": version("transformers"), "torch": torch.__version__, "python": platform.python_version()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dirs", type=Path, nargs="+", help="checkpoints, one after another in the same processes")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (over the data-parallel ranks)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the processes are killed")
    parser.add_argument("--no-scatter-fix", action="store_true", help="keep Bridge's gloo scatter bug (TP>1)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's parameter dtype")
    parser.add_argument("--stream", action="store_true",
                        help="keep no exported tensor in the timed exports (real widths); check one more export "
                             "tensor by tensor, untimed")
    args = parser.parse_args()
    args.hf_dirs = [hf_dir.resolve() for hf_dir in args.hf_dirs]

    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    world = args.tp * args.pp * args.ep
    with tempfile.TemporaryDirectory(prefix="bridge_hf_") as tmp:
        bridge_dirs = [str(sanitized_hf_dir(hf_dir, Path(tmp) / f"hf{index}")) for index, hf_dir in enumerate(args.hf_dirs)]
        context = mp.get_context("spawn")
        results = context.Queue()
        processes = mp.start_processes(worker, args=(world, free_port(), args, bridge_dirs, results), nprocs=world,
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
    for result in collected[0]:
        stdout.write(json.dumps(result) + "\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
