"""`mapgen verify`: a generated module against transformers and the checkpoint's own bytes.

Runs tp x pp x dp processes on CPU over gloo (or the processes torchrun started), builds the
megatron-core model for the module's dims (local layout), imports the HF checkpoint through the
module, runs a pipeline forward pass and compares the logits with transformers' forward of the
same checkpoint, then exports back and compares every tensor bit for bit with the original files.
Both models run in the checkpoint's dtype; with Megatron-LM's vocabulary padding the model has
the padded vocabulary, and the logits are compared on the HF one.

Everything that can be known before a process starts is checked before one does (`preflight`):
the module file is a mapping module, the layout suits its DIMS (`layout_problems`: the sizes
megatron-core would otherwise refuse with a traceback after the processes start), the
checkpoint's headers and index are sound and hold the module's HF tensors, and config.json is
for the module's architecture. Exported tensors are compared bit for bit (a NaN equals the same
NaN); NaN logits fail the verdict, which names the checkpoint's tensors that hold NaN or inf.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
import torch.distributed as dist

from mapgen.common.console import native_stdout_silenced
from mapgen.common.limits import MAX_SPAWNED
from mapgen.common.errors import MapgenError
from mapgen.common.parallel import ParallelLayout, size_problems
from mapgen.compiler.parallel_state import initialize_parallel_state
from mapgen.compiler.model_classes import build_model_chunks, model_class
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.hf_names import per_expert_names
from mapgen.verify.forward import hf_logits, hf_mtp_logits, pipeline_logits
from mapgen.verify.inputs import hf_problems, load_mapping_module
from mapgen.verify.llava import llava_layout_problems, run_llava_job
from mapgen.verify.megatron_cpu import prepare_cpu_megatron
from mapgen.verify.processes import spawn
from mapgen.verify.verdict import (
    Job,
    Result,
    agree_on_logits,
    cannot_equal,
    checkpoint_dtype,
    logit_tolerance,
    report_phase,
    same_bits,
)

INPUT_SHAPE = (2, 7)  # batch, sequence


# what a model class brings to verification beyond a GPTModel's: its own layout checks (in place
# of megatron-core's pipeline rules) and its own forward pass; the compiler's side of each model
# class is `mapgen.compiler.model_classes`
_LAYOUT_CHECKS: dict[str, Callable[[ModuleType, ParallelLayout], list[str]]] = {"llava": llava_layout_problems}
_RUNS: dict[str, Callable[..., None]] = {"llava": run_llava_job}


def _load_module(path: str) -> ModuleType:
    return load_mapping_module(path)


def layout_problems(module: ModuleType, layout: ParallelLayout) -> list[str]:
    """Everything megatron-core would refuse about running `module`'s model under `layout`, known
    from the module's DIMS and PARAMS before any process starts: positive sizes; TP dividing
    the attention heads, the query groups and every TP-split dimension; expert-TP every expert
    one; EP the experts; the layers over PP and VPP (with uneven first and last stages)."""
    found = layout.size_problems(flags=True)
    if found:
        return found
    found += layout.grid_problems()
    dims, target = module.DIMS, module.TARGET
    tp, etp = layout.tp, layout.etp or layout.tp
    if dims.num_attention_heads % tp:
        found.append(f"--tp {tp} does not divide the {dims.num_attention_heads} attention heads of {target}")
    if dims.num_query_groups % tp:
        found.append(f"--tp {tp} does not divide the {dims.num_query_groups} query groups (KV heads) of {target}")
    if dims.num_moe_experts is None:
        if layout.ep > 1:
            found.append(f"--ep {layout.ep}: {target} has no experts to distribute")
        if layout.etp is not None:
            found.append(f"--etp {layout.etp}: {target} has no experts")
    elif dims.num_moe_experts % layout.ep:
        found.append(f"--ep {layout.ep} does not divide the {dims.num_moe_experts} experts of {target}")
    if dims.num_moe_experts is not None and dims.add_bias_linear and etp != 1:
        found.append(
            f"expert-TP {etp}: megatron-core builds experts with biases ({target}) at expert-TP 1 only; "
            "give --etp 1"
        )
    from mapgen.runtime.placing import vocab_params

    vocab = vocab_params(module)  # padded to a multiple of TP: always divisible
    unsplit: dict[str, list[str]] = {}
    for plan in module.PARAMS:
        if plan.split_dim is None or plan.megatron_name in vocab:
            continue
        size, group = plan.shape[plan.split_dim], (etp if plan.expert_parallel else tp)
        if size % group:
            flag = f"--etp {etp}" if plan.expert_parallel and layout.etp is not None else f"--tp {tp}"
            key = f"{flag} does not divide dim {plan.split_dim} ({size}) of"
            unsplit.setdefault(key, []).append(plan.megatron_name)
    for key, names in unsplit.items():
        more = f" and {len(names) - 1} more parameter(s)" if len(names) > 1 else ""
        found.append(f"{key} {names[0]}{more}")
    own = _LAYOUT_CHECKS.get(getattr(module, "MODEL", "gpt"))
    return found + (own(module, layout) if own is not None else _pipeline_problems(module, layout))


def _pipeline_problems(module: ModuleType, layout: ParallelLayout) -> list[str]:
    """megatron-core's rules for placing the decoder layers on pipeline stages (its
    TransformerConfig's), in the user's terms."""
    model = model_class(getattr(module, "MODEL", "gpt"))
    per_layer = model.layers_per_decoder_layer  # a HybridModel's layer is half a decoder layer
    layers = module.DIMS.num_layers * per_layer
    what = f"the {layers} {f'{model.name} layers ({per_layer} per decoder layer)' if per_layer > 1 else 'layers'} of {module.TARGET}"
    pp, vpp, first, last = layout.pp, layout.vpp, layout.first_stage_layers, layout.last_stage_layers
    if not model.virtual_stages and vpp > 1:
        return [f"--vpp {vpp}: {model.name} models have no virtual pipeline stages in mapgen (megatron-core sets them with '|' in the layer pattern)"]
    if found := layout.stage_problems(flags=True):
        return found
    if first is None and last is None:
        if layers % pp:
            return [f"--pp {pp} does not divide {what}"]
        if (layers // pp) % vpp:
            return [f"--vpp {vpp} does not divide the {layers // pp} layers of each of the {pp} pipeline stages ({what})"]
        return []
    given = " ".join(
        f"--{flag} {value}" for flag, value in (("first-stage-layers", first), ("last-stage-layers", last)) if value is not None
    )
    if pp < 2:
        return [f"{given} needs --pp 2 or more (--pp {pp} has one stage)"]
    rest = layers - (first or 0) - (last or 0)
    middle = pp - (first is not None) - (last is not None)
    if rest < 0 or (rest > 0) != (middle > 0) or (middle and rest % middle) or (middle and rest // middle == 0):
        stages = f"{middle} other stage(s)" if middle else "no other stage"
        return [f"--pp {pp} {given} on {what}: leaves {rest} layer(s) for {stages}; every stage needs the same number of layers, at least one"]
    found = [
        f"--{flag} {value} is not a multiple of --vpp {vpp}"
        for flag, value in (("first-stage-layers", first), ("last-stage-layers", last))
        if value is not None and value % vpp
    ]
    if middle and (rest // middle) % vpp:
        found.append(f"--vpp {vpp} does not divide the {rest // middle} layers of each middle pipeline stage")
    return found


def preflight(job: Job, world_size: int | None = None) -> list[str]:
    """What is wrong with `job` that is known before any process starts: the module, the layout
    against its DIMS, the checkpoint's headers and index against its HF table, config.json's
    architecture; `world_size` (torchrun's) against the layout."""
    module = load_mapping_module(job.module_path)
    found = [f"layout {job.layout}: {problem}" for problem in layout_problems(module, job.layout)]
    found += size_problems({"make_vocab_size_divisible_by": job.make_vocab_size_divisible_by})
    if world_size is not None and world_size != job.layout.world_size:
        found.append(f"layout {job.layout} needs tp x pp x dp = {job.layout.world_size} processes, torchrun started {world_size}")
    elif world_size is None and not found and job.layout.world_size > MAX_SPAWNED:
        found.append(
            f"layout {job.layout} needs {job.layout.world_size} processes; verify starts at most {MAX_SPAWNED} "
            "on one machine (run it under torchrun for more)"
        )
    return found + hf_problems(module, job.hf_dir)


def run_job(job: Job) -> Result:
    """One verification in an initialised process group; every rank returns its Result."""
    from mapgen.runtime import ParallelContext
    from mapgen.runtime.drivers import Converter
    from mapgen.runtime.vocab import padded_vocab_size

    rank = dist.get_rank()
    result = Result(job, rank)
    try:
        module = _load_module(job.module_path)
        if module.LAYOUT != "local":
            raise MapgenError(f"{job.module_path} has the {module.LAYOUT} layout; verify runs local-layout modules")
        original = HFCheckpoint(job.hf_dir, unstack=per_expert_names(t.name for t in module.HF_TENSORS))
        dtype = checkpoint_dtype(original)
        vocab = module.DIMS.vocab_size
        padded = padded_vocab_size(vocab, job.make_vocab_size_divisible_by, job.layout.tp)
        result.dtype, result.vocab = str(dtype).removeprefix("torch."), (vocab, padded)
        rows = f"vocab {vocab}" + (f" padded to {padded}" if padded > vocab else "")
        report_phase(job, f"building the model ({job.layout}, {result.dtype}, {rows})")
        initialize_parallel_state(job.layout)
        prepare_cpu_megatron()
        ctx = ParallelContext.from_parallel_state()
        torch.manual_seed(0)
        chunks = build_model_chunks(module.DIMS, job.layout, params_dtype=dtype, vocab_size=padded, model=module.MODEL)
        converter = Converter(module, chunks, ctx, make_vocab_size_divisible_by=job.make_vocab_size_divisible_by)
        report_phase(job, f"loading {job.hf_dir} into the model")
        converter.load(job.hf_dir)
        report_phase(job, "forward: megatron-core against transformers")
        own_run = _RUNS.get(module.MODEL)
        if own_run is not None:  # LLaVA: an image and a prompt, not tokens alone
            own_run(job, module, chunks, converter, original, result)
            return result
        input_ids = torch.randint(0, vocab, INPUT_SHAPE, generator=torch.Generator().manual_seed(7))
        logits = pipeline_logits(chunks, input_ids, ctx, module.DIMS.hidden_size)
        found = torch.zeros(4)  # max logit diff, max |pad logit|, tolerance, NaN seen (0/1)
        if logits is not None:  # only the last stage has them: whatever happens here, every
            try:  # rank must still reach the all_reduce below, or the others wait forever
                import transformers

                with reference_folder(job, original) as reference_dir:
                    auto: Any = transformers.AutoModelForCausalLM
                    reference = auto.from_pretrained(reference_dir, dtype=dtype).eval()
                    expected = hf_logits(reference, input_ids).float()
                    mtp = hf_mtp_logits(reference, reference_dir, module, input_ids) if module.DIMS.mtp_num_layers else []
                seq = input_ids.shape[1]
                if module.DIMS.mtp_num_layers:  # each MTP layer's logits against the reference's
                    mtp_logits = logits[:, seq:]
                    logits = logits[:, :seq]
                    for depth, reference_logits in enumerate(mtp):
                        ours = mtp_logits[:, depth * seq : (depth + 1) * seq][:, : seq - depth - 1, :vocab].float()
                        # torch.maximum, not max(): NaN must win (it is not ordered)
                        found[0] = torch.maximum(found[0], (ours - reference_logits.float()).abs().max())
                found[0] = torch.maximum(found[0], (logits[..., :vocab].float() - expected).abs().max())  # pad logits dropped
                found[1] = logits[..., vocab:].float().abs().max() if padded > vocab else 0.0
                found[2] = logit_tolerance(dtype, expected)
            except Exception:  # noqa: BLE001 - reported below, after the collective
                result.error = traceback.format_exc()
                found[0] = float("inf")
        agree_on_logits(found, result, original)
        report_phase(job, "export: every tensor against the checkpoint's bytes")
        served = set(original.names())
        whole = HFCheckpoint(job.hf_dir) if converter.stacked else original  # the stacked tensors export writes back
        for name, tensor in converter.export():
            result.tensors += 1
            files = original if name in served else whole
            stored = files.get(name)
            if same_bits(tensor, stored):
                result.bit_exact += 1
            else:
                result.mismatched.append(name + cannot_equal(tensor, stored, files.dtype(name), result.dtype))
        missing = set(original.names()) - {converter.hf_name(t.name) for t in module.HF_TENSORS}  # the files' naming
        ignored = tuple(getattr(module, "IGNORED_HF", {}))  # what the module declares it does not map (a vision tower)
        result.mismatched += sorted(f"{name} (in the checkpoint, never exported)" for name in missing if not name.startswith(ignored))
    except MapgenError as exc:
        result.error = str(exc)
    except Exception:  # noqa: BLE001 - a verifier reports, it does not crash
        result.error = traceback.format_exc()
    return result


@contextmanager
def reference_folder(job: Job, checkpoint: HFCheckpoint) -> Iterator[str]:
    """The folder transformers loads the reference from: the checkpoint's own; for an FP8
    block-quantized one (DeepSeek-V3's published form), its dequantized twin, written for the
    while (in `job.scratch`, else a temporary folder): the weights mapgen dequantizes
    (`HFCheckpoint.get`), config.json without the quantization. transformers' own FP8 loading
    needs `accelerate`, which mapgen does not depend on."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    if not checkpoint.fp8:
        yield job.hf_dir
        return
    folder = Path(tempfile.mkdtemp(prefix="dequantized-", dir=job.scratch))
    try:
        tensors = {name: checkpoint.get(name).contiguous() for name in checkpoint.names()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = {k: v for k, v in checkpoint.config.items() if k != "quantization_config"}
        (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        del tensors
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def verify(jobs: list[Job], world_size: int, phase: Callable[[str], None] | None = None) -> list[Result]:
    """Rank 0's result of each job (all ranks agree on errors; rank 0 compares the tensors).
    Raises MapgenError, before any process starts, for what `preflight` finds. `phase` is told
    the parent's phases (checking, starting the processes); the ranks report theirs to each
    job's `progress` file."""
    say = phase or (lambda text: None)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    say("checking the module, the layout and the checkpoint")
    for job in jobs:  # everything known before a process starts is said before one does
        if problems := preflight(job, int(os.environ["WORLD_SIZE"]) if torchrun else None):
            raise MapgenError(f"cannot verify {job.module_path} on {job.hf_dir}:\n  " + "\n  ".join(problems))
    if torchrun:  # started by torchrun
        if not dist.is_initialized():
            with native_stdout_silenced():
                dist.init_process_group("gloo")
        return [run_job(job) for job in jobs]
    say(f"starting {world_size} process{'es' if world_size > 1 else ''}")
    return list(spawn([(run_job, (job,)) for job in jobs], world_size)[0])
