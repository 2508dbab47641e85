"""`make bench`'s real-width weight-sync benchmark: mapgen and Megatron-Bridge 0.6.2 moving bf16
weights of published tensor widths (few layers), against `copy_` and against the collective alone.

    .venv312/bin/python benchmarks/realwidth.py [--cases llama:TP1 llama:TP2 llama:PP2 qwen3_moe:EP2 deepseek_v3:EP2]
        [--layers 2] [--repeat 3] [--rounds 1] [--folder /tmp/mapgen-realwidth] [--max-gb 16] [--no-bridge]
        [--profile DIR] [--bucket-bytes N]
        [--json benchmarks/realwidth-current.json]

Models (transformers config classes, published widths, few layers; random bf16 weights saved with
safetensors in <=2 GB shards; the mapping module made by `mapgen build SPEC config.json -o
mapping.py --layout local`; the checkpoints are kept in --folder and read from the page cache,
which `settle_page_cache` leaves as a read from disk does before each case):
- Llama-3.1-8B widths (hidden 4096, FFN 14336, vocabulary 128256, 32/8 heads), --layers layers, at TP1,
  TP2, PP2;
- Qwen3-30B-A3B widths (hidden 2048, 128 experts of FFN 768, vocabulary 151936), 2 layers, at EP2;
- DeepSeek-V3 widths (MLA, 256 experts of 2048), one dense and one MoE layer, at EP2: measured only
  when its checkpoint and two ranks' models fit in the memory available (--max-gb), otherwise the
  JSON records why not, with the sizes.

For each layout and round (--rounds), mapgen (this interpreter's stack, 1-2 gloo processes) and
then Bridge 0.6.2 (`bridge_runner.py --dtype bf16 --stream` in .venv-bench062, same layout) each
run --repeat repeats in one set of fresh processes; a time is the slowest rank's in a repeat, and
the table reports the median over every round's repeats (rounds interleave the two tools). Per repeat mapgen times (a barrier before each):
- `copy_`: every local parameter written with `param.copy_(src)` from a RAM buffer (the memcpy
  bound on the same bytes, same processes);
- import: a fresh `Converter(...).load(hf_dir)`;
- export: a held Converter's `export()` (repeated weight syncs), then a fresh one's (cold);
- collective alone: the collectives that one export makes (recorded once, untimed), replayed on
  buffers made once (shapes recorded, buckets of one size share them) with nothing else (the
  gather's own cost); and again into buffers allocated for every call, as the export allocates
  its own (the gather plus first-touch page faults on fresh memory).
Peak RSS per rank: VmHWM, reset (/proc/self/clear_refs) before each timed phase, MiB.
GB/s = the HF checkpoint's bytes / the time. Bridge's exports are checked byte for byte against
the checkpoint (in an untimed pass); mapgen's are checked on rank 0 in an untimed pass too.
--profile DIR writes a cProfile of rank 0's import and held export per case (the time's breakdown).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mapgen.common.parallel import ParallelLayout  # noqa: E402
from mapgen.compiler.parallel_state import initialize_parallel_state  # noqa: E402
from mapgen.compiler.model_classes import build_model_chunks  # noqa: E402
from mapgen.runtime import ParallelContext  # noqa: E402
from mapgen.runtime import fileread  # noqa: E402
from mapgen.runtime.drivers import DEFAULT_BUCKET_BYTES, Converter  # noqa: E402
from mapgen.verify import megatron_cpu, testing  # noqa: E402
from mapgen.verify.processes import spawn  # noqa: E402

BRIDGE = ROOT / ".venv-bench062" / "bin" / "python"
LAYOUTS = {"TP1": ParallelLayout(), "TP2": ParallelLayout(tp=2), "PP2": ParallelLayout(pp=2),
           "EP2": ParallelLayout(ep=2, dp=2)}
SHARD_BYTES = 2 * 1024**3
RECORDED = ("all_gather", "all_gather_into_tensor", "broadcast", "all_reduce", "scatter", "send", "recv")

# published widths (config.json of meta-llama/Llama-3.1-8B, Qwen/Qwen3-30B-A3B, deepseek-ai/DeepSeek-V3)
MODELS: dict[str, dict[str, Any]] = {
    "llama": {
        "title": "Llama-3.1-8B widths", "config": "LlamaConfig", "spec": "specs/llama.yaml",
        "fields": dict(hidden_size=4096, intermediate_size=14336, vocab_size=128256, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    },
    "qwen3_moe": {
        "title": "Qwen3-30B-A3B widths", "config": "Qwen3MoeConfig", "spec": "specs/qwen3_moe.yaml", "layers": 2,
        "fields": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                       num_experts_per_tok=8, vocab_size=151936, num_attention_heads=32, num_key_value_heads=4,
                       head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    },
    "deepseek_v3": {
        "title": "DeepSeek-V3 widths", "config": "DeepseekV3Config", "spec": "specs/deepseek_v3.yaml", "layers": 2,
        "fields": dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
                       n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1, vocab_size=129280,
                       num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                       qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=8, topk_group=4,
                       max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False),
    },
}


# ---------------------------------------------------------------- checkpoints


def make_checkpoint(folder: Path, model: str, layers: int) -> tuple[Path, Path, int]:
    """config.json from the transformers config class, the mapping module from `mapgen build`, and
    random bf16 weights for every HF tensor the module names; (hf_dir, module, checkpoint bytes).
    Kept in `folder` and reused when complete (`.complete` is written last)."""
    import transformers
    from safetensors.torch import save_file

    info = MODELS[model]
    hf_dir = folder / f"{model}{layers}"
    module_path = hf_dir / "mapping.py"
    done = hf_dir / ".complete"
    if not done.exists():
        hf_dir.mkdir(parents=True, exist_ok=True)
        config = getattr(transformers, info["config"])(num_hidden_layers=layers, **info["fields"])
        config.dtype = torch.bfloat16
        config.architectures = [info["config"].replace("Config", "ForCausalLM")]  # AutoBridge dispatches on it
        config.save_pretrained(hf_dir)
        subprocess.run([str(Path(sys.executable).parent / "mapgen"), "build", str(ROOT / info["spec"]),
                        str(hf_dir / "config.json"), "-o", str(module_path), "--layout", "local"],
                       check=True, capture_output=True, text=True)
    module = testing.import_module_from_path(module_path, f"realwidth_{model}{layers}")
    plans = list(module.HF_TENSORS)
    nbytes = sum(2 * _numel(p.shape) for p in plans)
    if not done.exists():
        if too_large(nbytes) is not None:
            return hf_dir, module_path, nbytes  # too large: not written (the caller records why)
        generator = torch.Generator().manual_seed(0)
        shards: list[list[Any]] = [[]]
        size = 0
        for plan in plans:
            if size and size + 2 * _numel(plan.shape) > SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append(plan)
            size += 2 * _numel(plan.shape)
        weight_map = {}
        for index, shard in enumerate(shards):
            name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {p.name: (torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16) for p in shard}
            save_file(tensors, str(hf_dir / name), metadata={"format": "pt"})
            weight_map |= {p.name: name for p in shard}
            del tensors
        (hf_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": nbytes}, "weight_map": weight_map}, indent=1) + "\n")
        done.write_text("ok\n")
    return hf_dir, module_path, nbytes


def settle_page_cache(hf_dir: Path) -> int:
    """Put the checkpoint's files in the page cache as a read from disk leaves them: written back,
    dropped from the cache (posix_fadvise DONTNEED), then read through once. The pages a write
    leaves (save_file's) are small folios, while a read through readahead makes large ones on
    kernels and filesystems that have them (ext4 on Linux 6.16+): copying out of the cache costs
    less per byte there, for both tools alike. A checkpoint an engineer imports was read from
    disk, or stayed cached after such a read; settling makes every run start from that state
    instead of from whatever the last write or read left. Returns the kernel's FileHugePages
    (MiB) after the read: how much of the cache is in 2 MiB folios."""
    chunk = bytearray(64 << 20)
    for path in sorted(hf_dir.glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            while os.readv(fd, [chunk]) > 0:
                pass
        finally:
            os.close(fd)
    match = re.search(r"FileHugePages:\s+(\d+)", Path("/proc/meminfo").read_text())
    return int(match.group(1)) // 1024 if match else 0


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


MAX_GB: float = 0.0  # set from --max-gb


def too_large(nbytes: int) -> str | None:
    """Why this checkpoint cannot be measured here (None: it can). Two ranks at EP2 hold the
    replicated part each and half the experts, plus the checkpoint in the page cache and one
    tensor in flight: about 2x the checkpoint's bytes, which must stay under --max-gb."""
    need = 2 * nbytes / 1e9
    if need > MAX_GB:
        return (f"does not fit: the checkpoint is {nbytes / 1e9:.1f} GB in bf16; page cache and two ranks' models need "
                f"about {need:.1f} GB, over the {MAX_GB:g} GB allowed (--max-gb; {available_gb():.1f} GB available now)")
    return None


# ---------------------------------------------------------------- mapgen, in each rank


def _hwm_mib() -> float:
    match = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def _rss_mib(field: str = "VmRSS") -> float:
    match = re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def measure(module_path: str, hf_dir: str, layout: ParallelLayout, repeat: int, profile_to: str | None,
            bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> dict[str, Any]:
    load = [round(x, 2) for x in os.getloadavg()]
    module = testing.import_module_from_path(Path(module_path), f"realwidth_{Path(module_path).parent.name}")
    initialize_parallel_state(layout)
    megatron_cpu.prepare_cpu_megatron()
    chunks = build_model_chunks(module.DIMS, layout, params_dtype=torch.bfloat16)
    ctx = ParallelContext.from_parallel_state()
    params = [p for chunk in chunks for p in chunk.parameters()]
    local_bytes = sum(p.numel() * p.element_size() for p in params)
    # warms the page cache and the module's lookups, untimed; a fresh Converter, since a Converter
    # keeps the checkpoint's files mapped after its load (file pages that would count in RSS)
    Converter(module, chunks, ctx).load(hf_dir)
    held = Converter(module, chunks, ctx)

    # the collectives of one export, recorded (untimed) to replay alone
    recorded: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    originals = {name: getattr(dist, name) for name in RECORDED}

    def recorder(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            recorded.append((name, _shapes(args), kwargs))  # shapes only: no bucket is kept alive
            return originals[name](*args, **kwargs)
        return call

    for name in RECORDED:
        setattr(dist, name, recorder(name))
    exported_bytes = 0
    try:
        for _name, tensor in held.export(bucket_bytes=bucket_bytes):
            exported_bytes += tensor.numel() * tensor.element_size()
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
    checked = check_export(held, hf_dir)  # every rank takes part in the export's collectives
    model_rss = _rss_mib()
    gc.collect()
    gc.freeze()

    source: list[torch.Tensor] = []  # the copy's source: allocated before the timed copy, freed after

    def copy_all() -> None:
        with torch.no_grad():
            for p in params:
                p.view(-1).copy_(source[0][: p.numel()])

    # the page-cache read alone: as many bytes as this rank's parameters hold, read from the
    # checkpoint's (page-cached) files straight into them by os.preadv on import's thread pool
    files = [os.open(f, os.O_RDONLY) for f in sorted(Path(hf_dir).glob("*.safetensors"))]
    sizes = [os.fstat(fd).st_size for fd in files]
    runs: list[tuple[torch.Tensor, int, int]] = []  # (parameter, file, offset)
    file_index, offset = 0, 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if offset + nbytes > sizes[file_index]:
            file_index, offset = (file_index + 1) % len(files), 0
        runs.append((p.data, files[file_index], offset))
        offset += nbytes

    def read_all() -> None:
        with fileread.reading():
            for tensor, fd, start in runs:
                fileread.read_into(tensor, fd, start)

    def export_all(converter: Converter) -> None:
        for _name, _tensor in converter.export(bucket_bytes=bucket_bytes):
            pass

    buffers: dict[Any, torch.Tensor] = {}  # one per (shape, dtype, place in the call): buckets of a size share them

    def materialize(args: tuple[Any, ...]) -> list[Any]:
        out: list[Any] = []
        for place, a in enumerate(args):
            if isinstance(a, Spec):
                out.append(buffers.setdefault((a, place), torch.empty(a.shape, dtype=a.dtype)))
            elif isinstance(a, list):
                out.append([buffers.setdefault((t, place, i), torch.empty(t.shape, dtype=t.dtype)) for i, t in enumerate(a)])
            else:
                out.append(a)
        return out

    replays: list[tuple[str, list[Any], dict[str, Any]]] = []  # made (and touched) before the timed replay, freed after

    def replay() -> None:
        for name, args, kwargs in replays:
            originals[name](*args, **kwargs)

    def replay_fresh() -> None:  # the same, into buffers allocated for each call (first-touch page faults)
        for name, args, kwargs in recorded:
            fresh: list[Any] = [torch.empty(a.shape, dtype=a.dtype) if isinstance(a, Spec) else
                                [torch.empty(t.shape, dtype=t.dtype) for t in a] if isinstance(a, list) else a
                                for a in args]
            originals[name](*fresh, **kwargs)
            del fresh

    calls = {
        "copy_s": copy_all,
        "read_s": read_all,
        "import_s": lambda: Converter(module, chunks, ctx).load(hf_dir),
        "export_s": lambda: export_all(held),
        "export_cold_s": lambda: export_all(Converter(module, chunks, ctx)),
        "collective_s": replay,
        "collective_fresh_s": replay_fresh,
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    peaks: dict[str, float] = {}
    file_mib: dict[str, float] = {}
    for _ in range(repeat):
        for key, call in calls.items():
            if key == "copy_s":
                source.append(torch.randn(max(p.numel() for p in params)).to(torch.bfloat16))
            if key == "collective_s":
                replays.extend((name, materialize(args), kwargs) for name, args, kwargs in recorded)
                for buffer in buffers.values():
                    buffer.zero_()  # first touch outside the timed replay
            dist.barrier()
            _reset_peak()
            started = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - started)
            peaks[key] = max(peaks.get(key, 0.0), _hwm_mib())
            file_mib[key] = max(file_mib.get(key, 0.0), _rss_mib("RssFile"))
            source.clear()
            replays.clear()
            buffers.clear()  # so that no phase's peak RSS counts the replay's buffers
    profile = None
    if profile_to and dist.get_rank() == 0:
        profile = {}
        for key in ("import_s", "export_s"):
            profiler = cProfile.Profile()
            profiler.enable()
            calls[key]()
            profiler.disable()
            path = Path(profile_to + f".{key[:-2]}.prof")
            profiler.dump_stats(str(path))
            profile[key] = top_functions(profiler)
    elif profile_to:  # the other ranks take part in the collectives
        for key in ("import_s", "export_s"):
            calls[key]()
    for fd in files:
        os.close(fd)
    return {"times": times, "peak_rss_mib": {k: round(v) for k, v in peaks.items()}, "model_rss_mib": round(model_rss),
            "file_rss_mib": {k: round(v) for k, v in file_mib.items()},
            "local_bytes": local_bytes, "exported_bytes": exported_bytes, "load_at_start": load,
            "collectives": [(name, _bytes(args)) for name, args, _ in recorded], "checked": checked,
            "profile": profile}


@dataclass(frozen=True)
class Spec:
    """A recorded collective's tensor argument: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _shapes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    def spec(t: Any) -> Any:
        return Spec(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t
    return tuple([spec(t) for t in a] if isinstance(a, list) else spec(a) for a in args)


def _bytes(args: tuple[Any, ...]) -> int:
    total = 0
    for a in args:
        for t in a if isinstance(a, list) else [a]:
            if isinstance(t, Spec):
                total += _numel(t.shape) * t.dtype.itemsize
    return total


def check_export(converter: Converter, hf_dir: str) -> dict[str, int] | None:
    """Rank 0's exported tensors against the checkpoint's bytes (untimed); every rank exports."""
    from safetensors import safe_open

    index = json.loads((Path(hf_dir) / "model.safetensors.index.json").read_text())["weight_map"]
    handles: dict[str, Any] = {}
    seen, bad = 0, 0
    for name, tensor in converter.export():
        if dist.get_rank() != 0:
            continue
        file = index[name]
        if file not in handles:
            handles[file] = safe_open(str(Path(hf_dir) / file), "pt")
        want = handles[file].get_tensor(name)
        seen += 1
        if tensor.shape != want.shape or tensor.dtype != want.dtype or not torch.equal(tensor, want):
            bad += 1
    if dist.get_rank() != 0:
        return None
    return {"tensors": seen, "checkpoint_tensors": len(index), "mismatched": bad + len(index) - seen}


def top_functions(profiler: cProfile.Profile, count: int = 8) -> list[dict[str, Any]]:
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": calls, "self_s": round(tottime, 4),
                     "cumulative_s": round(cumtime, 4)})
    rows.sort(key=lambda r: -r["self_s"])
    return rows[:count]


# ---------------------------------------------------------------- the run


def median_of_slowest(per_rank: list[dict[str, Any]], key: str) -> float:
    runs = len(per_rank[0]["times"][key])
    return statistics.median(max(r["times"][key][i] for r in per_rank) for i in range(runs))


def ours(hf_dir: Path, module: Path, layout: ParallelLayout, repeat: int, profile: str | None,
         bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> dict[str, Any]:
    per_rank_d = spawn([(measure, (str(module), str(hf_dir), layout, repeat, profile, bucket_bytes))], layout.world_size,
                       timeout_s=3600, what="real-width benchmark")
    per_rank = [per_rank_d[r][0] for r in sorted(per_rank_d)]
    keys = per_rank[0]["times"]
    return {
        "median_s": {k: round(median_of_slowest(per_rank, k), 4) for k in keys},
        "times_s": {k: [round(max(r["times"][k][i] for r in per_rank), 4) for i in range(len(per_rank[0]["times"][k]))]
                    for k in keys},
        "peak_rss_mib": [r["peak_rss_mib"] for r in per_rank],
        "model_rss_mib": [r["model_rss_mib"] for r in per_rank],
        "file_rss_mib": [r["file_rss_mib"] for r in per_rank],
        "local_bytes": [r["local_bytes"] for r in per_rank],
        "exported_bytes": per_rank[0]["exported_bytes"],
        "collectives": {name: sum(1 for n, _ in per_rank[0]["collectives"] if n == name)
                        for name in sorted({n for n, _ in per_rank[0]["collectives"]})},
        "collective_bytes": sum(b for _, b in per_rank[0]["collectives"]),
        "checked": per_rank[0]["checked"],
        "profile": per_rank[0]["profile"],
        "load_at_start": per_rank[0]["load_at_start"],
    }


def theirs(hf_dir: Path, layout: ParallelLayout, repeat: int) -> dict[str, Any]:
    result = subprocess.run(
        [str(BRIDGE), str(ROOT / "benchmarks" / "bridge_runner.py"), str(hf_dir), "--tp", str(layout.tp), "--pp",
         str(layout.pp), "--ep", str(layout.ep), "--repeat", str(repeat), "--dtype", "bf16", "--stream",
         "--timeout", "3600"],
        capture_output=True, text=True, timeout=3700,
    )
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    rows = [json.loads(line) for line in result.stdout.strip().splitlines() if line.startswith("{")]
    return rows[0]


def merged_mapgen(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's rounds as one: every round's repeats, their median; the largest peaks; the first
    round's profile and checks."""
    out = dict(rounds[0])
    out["times_s"] = {k: [t for r in rounds for t in r["times_s"][k]] for k in rounds[0]["times_s"]}
    out["median_s"] = {k: round(statistics.median(v), 4) for k, v in out["times_s"].items()}
    out["peak_rss_mib"] = [{k: max(r["peak_rss_mib"][rank][k] for r in rounds) for k in rounds[0]["peak_rss_mib"][rank]}
                           for rank in range(len(rounds[0]["peak_rss_mib"]))]
    out["load_at_start"] = [r["load_at_start"] for r in rounds]
    out["rounds"] = len(rounds)
    return out


def merged_bridge(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not rounds:
        return None
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    out = dict(rounds[0])
    out["times_s"] = {k: [t for r in rounds for t in r["times_s"][k]] for k in rounds[0]["times_s"]}
    for phase in ("import", "export", "export_held"):
        out[f"{phase}_median_s"] = round(statistics.median(out["times_s"][phase]), 4)
    out["peak_rss_mib"] = [{k: max(r["peak_rss_mib"][rank][k] for r in rounds) for k in rounds[0]["peak_rss_mib"][rank]}
                           for rank in range(len(rounds[0]["peak_rss_mib"]))]
    out["mismatched"] = sum(r.get("mismatched") or 0 for r in rounds)
    out["load_at_start"] = [r["load_at_start"] for r in rounds]
    out["rounds"] = len(rounds)
    return out


def row_for(model: str, layers: int, name: str, nbytes: int, mine: dict[str, Any], bridge: dict[str, Any] | None) -> dict[str, Any]:
    gb = nbytes / 1e9
    m = mine["median_s"]
    row: dict[str, Any] = {
        "model": model, "title": MODELS[model]["title"], "layers": layers, "layout": name, "checkpoint_gb": round(gb, 3),
        "mapgen": mine,
        "gb_s": {"copy": round(gb / m["copy_s"], 2), "import": round(gb / m["import_s"], 2),
                 "export": round(gb / m["export_s"], 2), "export_cold": round(gb / m["export_cold_s"], 2)},
        # the fraction of the bound each reaches: bound time / mapgen's time
        "import_vs_copy": round(m["copy_s"] / m["import_s"], 3),
        "import_vs_read": round(m["read_s"] / m["import_s"], 3) if m.get("read_s") else None,
        "export_vs_copy": round(m["copy_s"] / m["export_s"], 3),
        "export_vs_collective": round(m["collective_s"] / m["export_s"], 3) if m["collective_s"] > 1e-4 else None,
        "bridge": bridge,
    }
    if bridge and "import_median_s" in bridge:
        row["gb_s"] |= {"bridge_import": round(gb / bridge["import_median_s"], 2),
                        "bridge_export": round(gb / bridge["export_median_s"], 2)}
        row["speedup"] = {
            "import": round(bridge["import_median_s"] / m["import_s"], 2),
            "export_held": round(bridge["export_median_s"] / m["export_s"], 2),
            "export_cold": round(bridge["export_median_s"] / m["export_cold_s"], 2),
            "export_held_vs_bridge_held_tasks": round(bridge["export_held_median_s"] / m["export_s"], 2)
            if bridge.get("export_held_median_s") else None,
        }
        row["bridge_import_vs_copy"] = round(m["copy_s"] / bridge["import_median_s"], 3)
        row["bridge_export_vs_copy"] = round(m["copy_s"] / bridge["export_median_s"], 3)
    return row


def main() -> None:
    global MAX_GB
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["llama:TP1", "llama:TP2", "llama:PP2", "qwen3_moe:EP2",
                                                       "deepseek_v3:EP2"])
    parser.add_argument("--layers", type=int, default=2, help="Llama layers (2-4)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per round, in one set of processes")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds per case, each mapgen then Bridge in fresh processes (medians over all repeats)")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mapgen-realwidth"))
    parser.add_argument("--max-gb", type=float, default=16.0, help="memory the largest case may take")
    parser.add_argument("--no-bridge", action="store_true")
    parser.add_argument("--bucket-bytes", type=int, default=DEFAULT_BUCKET_BYTES,
                        help="mapgen's export buckets (default: the runtime's default)")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of rank 0's import/export here")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "realwidth.json")
    args = parser.parse_args()
    MAX_GB = args.max_gb
    from tables import run_metadata  # noqa: PLC0415

    meta = run_metadata() | {"torch": torch.__version__, "bucket_bytes": args.bucket_bytes}
    if not args.no_bridge and not BRIDGE.exists():
        raise SystemExit("no .venv-bench062: run `bash benchmarks/bridge_setup.sh` first (make bench does)")
    args.folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []

    def write() -> None:
        meta_now = meta | {"load_average_end": [round(x, 2) for x in os.getloadavg()]}
        args.json.write_text(json.dumps({"meta": meta_now, "repeat": args.repeat, "rounds": args.rounds, "rows": rows,
                                         "skipped": skipped},
                                        indent=2) + "\n")

    for case in args.cases:
        model, _, name = case.partition(":")
        layers = MODELS[model].get("layers", args.layers)
        hf_dir, module, nbytes = make_checkpoint(args.folder, model, layers)
        why = too_large(nbytes)
        if why is not None:
            skipped.append({"model": model, "title": MODELS[model]["title"], "layers": layers, "layout": name,
                            "checkpoint_gb": round(nbytes / 1e9, 2), "reason": why})
            print(f"{case}: {why}", file=sys.stderr, flush=True)
            write()
            continue
        file_huge_mib = settle_page_cache(hf_dir)
        profile = str(args.profile / f"{model}{layers}-{name}") if args.profile else None
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        mines: list[dict[str, Any]] = []
        bridges: list[dict[str, Any]] = []
        for round_ in range(args.rounds):  # mapgen and Bridge interleaved: each round runs both, fresh processes
            mines.append(ours(hf_dir, module, LAYOUTS[name], args.repeat, profile if round_ == 0 else None, args.bucket_bytes))
            print(f"{case}: mapgen {mines[-1]['median_s']}", file=sys.stderr, flush=True)
            if not args.no_bridge and model != "deepseek_v3":  # bridge_runner builds Llama and Qwen3-MoE only
                bridges.append(theirs(hf_dir, LAYOUTS[name], args.repeat))
                print(f"{case}: Bridge {({k: v for k, v in bridges[-1].items() if k.endswith('median_s')})}",
                      file=sys.stderr, flush=True)
        rows.append(row_for(model, layers, name, nbytes, merged_mapgen(mines), merged_bridge(bridges))
                    | {"file_huge_pages_mib": file_huge_mib})
        write()
    write()


if __name__ == "__main__":
    main()
