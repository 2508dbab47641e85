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

import io
import json
import math
import os
import signal
import socket
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import start_processes

from mapgen.common.console import native_stdout_silenced, quiet_libraries
from mapgen.common.files import module_label
from mapgen.common.limits import MAX_SPAWNED
from mapgen.common.errors import MapgenError
from mapgen.compiler.megatron_model import (
    ParallelLayout,
    build_model_chunks,
    initialize_parallel_state,
)
from mapgen.runtime.checkpoint import HFCheckpoint
from mapgen.runtime.hf_names import per_expert_names
from mapgen.runtime.safetensors_files import DTYPES
from mapgen.verify.arguments import size_problems

INPUT_SHAPE = (2, 7)  # batch, sequence
FLOAT32_TOLERANCE = 1e-5  # max abs logit difference in float32 (measured: 1.5e-7 to 2.4e-7)
HALF_EPSILONS = 16  # in bfloat16 or float16: this many epsilons of the largest logit (logit_tolerance)
_FLOATS = ("F32", "BF16", "F16")  # safetensors spellings a model's dtype can be taken from


@dataclass(frozen=True)
class Job:
    """One verification: a module file (local layout), an HF folder, a layout."""

    module_path: str
    hf_dir: str
    layout: ParallelLayout
    make_vocab_size_divisible_by: int = 1  # Megatron-LM's vocabulary padding, x TP
    progress: str | None = None  # a file rank 0 appends each phase's name to (a line each), or None
    scratch: str | None = None  # a folder the ranks may write in (the CLI's temporary one), or None


def report_phase(job: Job, phase: str) -> None:
    """Rank 0 says which phase `job` has reached: a line appended to `job.progress`, which the
    process that started the ranks follows (`mapgen.common.console.Phases.follow`)."""
    if job.progress is None or (dist.is_initialized() and dist.get_rank() != 0):
        return
    try:
        with open(job.progress, "a", encoding="utf-8") as file:
            file.write(phase.replace("\n", " ") + "\n")
    except OSError:  # progress is a courtesy: the verification goes on without it
        pass


@dataclass
class Result:
    job: Job
    rank: int
    error: str | None = None
    tensors: int = 0
    bit_exact: int = 0
    mismatched: list[str] = field(default_factory=list)
    max_logit_diff: float = float("nan")
    dtype: str = "float32"
    tolerance: float = FLOAT32_TOLERANCE
    vocab: tuple[int, int] = (0, 0)  # HF vocabulary, the model's padded one
    max_pad_logit: float = 0.0  # largest |logit| of a pad row: zero rows give exactly 0
    nonfinite: list[str] = field(default_factory=list)  # checkpoint tensors holding NaN or inf
    parts: dict[str, float] = field(default_factory=dict)  # LLaVA: max diff of each output compared

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.tensors > 0
            and self.bit_exact == self.tensors
            and math.isfinite(self.max_logit_diff)
            and self.max_logit_diff <= self.tolerance
            and self.max_pad_logit == 0.0
        )

    def summary(self) -> str:
        name = module_label(self.job.module_path)
        if self.error is not None:
            return f"verify {name} {self.job.layout}: FAILED\n{self.error}"
        verdict = "OK" if self.ok else "FAILED"
        vocab, padded = self.vocab
        padding = f", vocab {vocab} padded to {padded} (pad logits max {self.max_pad_logit:.3g})" if padded > vocab else ""
        line = (
            f"verify {name} {self.job.layout}: {self.tensors} tensors checked, "
            f"{self.bit_exact} bit-exact, {self.dtype}{padding}, max logit diff "
            f"{self.max_logit_diff:.3g} (tolerance {self.tolerance:.3g}): {verdict}"
        )
        if self.parts:
            line = line.replace(" max logit diff ", " max diff ", 1)
            line += "\n  " + ", ".join(f"{name} {diff:.3g}" for name, diff in self.parts.items())
        if self.mismatched:
            line += "\n  differ: " + ", ".join(self.mismatched)
        if math.isnan(self.max_logit_diff):
            line += "\n  the logits are NaN, so they prove nothing about the mapping: " + (
                "the checkpoint holds NaN or inf in " + ", ".join(self.nonfinite)
                if self.nonfinite
                else "no tensor of the checkpoint holds NaN or inf"
            )
        return line


def pipeline_logits(chunks: list[Any], input_ids: torch.Tensor, ctx: Any, hidden_size: int) -> torch.Tensor | None:
    """Forward of one micro-batch through every (virtual) pipeline stage, by hand: megatron-core's
    schedules assume CUDA. Returns the logits on the rank that runs the last stage; with
    multi-token prediction, [batch, (1 + MTP layers) x seq, vocab]: the main model's logits,
    then each MTP layer's (see `_mtp_logits_returned`)."""
    batch, seq = input_ids.shape
    positions = torch.arange(seq).unsqueeze(0).expand_as(input_ids)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    logits = None
    pp = ctx.pp
    dtype = next(chunks[0].parameters()).dtype
    with torch.no_grad():
        for vp_stage, chunk in enumerate(chunks):
            for stage in range(pp.size):
                if stage != pp.rank:
                    continue
                first = vp_stage == 0 and stage == 0
                last = vp_stage == len(chunks) - 1 and stage == pp.size - 1
                if not first:
                    received = torch.empty(seq, batch, hidden_size, dtype=dtype)
                    source = (stage - 1) % pp.size
                    dist.recv(received, src=dist.get_global_rank(pp.handle, source))
                    chunk.set_input_tensor(received)
                with _mtp_logits_returned(chunk):
                    output = chunk(input_ids, positions, attention_mask=mask)
                if last:
                    logits = output
                else:
                    target = (stage + 1) % pp.size
                    dist.send(output.contiguous(), dst=dist.get_global_rank(pp.handle, target))
    return logits


@contextmanager
def _mtp_logits_returned(chunk: Any) -> Iterator[None]:
    """A GPTModel with an MTP block runs it on its last stage and appends its hidden states to
    the main model's along the sequence; with `mtp_num_layers` set it then turns them into an
    MTP loss, which needs labels (megatron-core 0.16 fails without them, 0.19 takes them from
    the input and drops the MTP hidden states). Here the setting is switched off once the block
    has run (megatron-core 0.19's block reads it), so the output layer gives the logits of both."""
    config: Any = getattr(chunk, "config", None)
    saved = getattr(config, "mtp_num_layers", None)
    if not getattr(chunk, "mtp_process", False) or saved is None:
        yield
        return

    def after_block(*_: Any) -> None:
        config.mtp_num_layers = None

    handle = chunk.mtp.register_forward_hook(after_block)
    try:
        yield
    finally:
        handle.remove()
        config.mtp_num_layers = saved


VERIFY_FIELDS = ("LAYOUT", "MODEL", "DIMS")  # what verify needs beyond what every conversion needs


def load_mapping_module(path: str | Path, name: str | None = None) -> ModuleType:
    """Import a generated module from its file; a file that is not one is a MapgenError saying
    why (not Python, fails to import, lacks what a mapping module has), not a traceback."""
    from mapgen.runtime.module_check import module_problems
    from mapgen.runtime.package import import_path

    file = Path(path)
    if file.is_dir() and (file / "__init__.py").is_file():  # a target package
        file = file / "__init__.py"
    if not file.is_file():
        raise MapgenError(f"{file}: no such file")
    if file.suffix != ".py":
        raise MapgenError(f"{file}: not a mapgen mapping module: not a Python file (.py)")
    module_name = name or f"mapgen_verify_{''.join(c if c.isalnum() else '_' for c in module_label(file))}"
    try:
        module = import_path(file, module_name)
    except SyntaxError as exc:
        raise MapgenError(f"{file}:{exc.lineno}:{exc.offset}: not a mapgen mapping module: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the file does when imported
        older = (isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("mapgen.")) or (
            isinstance(exc, TypeError) and ("ParamPlan" in str(exc) or "RulePlan" in str(exc))
        )
        hint = "; it was built by another mapgen version: rebuild it (its header's Regenerate line)" if older else ""
        raise MapgenError(
            f"{file}: not a mapgen mapping module: importing it raised {type(exc).__name__}: {exc}{hint}"
        ) from None
    problems = module_problems(module)
    lacking = [field for field in VERIFY_FIELDS if not hasattr(module, field)]
    if lacking:
        problems.append(f"lacks {', '.join(lacking)}")
    if problems:
        raise MapgenError(f"{file}: not a mapgen mapping module (mapgen build writes them): it {'; '.join(problems)}")
    return module


def _load_module(path: str) -> ModuleType:
    return load_mapping_module(path)




def layout_sizes(layout: ParallelLayout) -> dict[str, int | None]:
    """The layout's sizes by field, for `size_problems`."""
    return {
        "tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "ep": layout.ep, "dp": layout.dp, "etp": layout.etp,
        "first_stage_layers": layout.first_stage_layers, "last_stage_layers": layout.last_stage_layers,
    }


def layout_problems(module: ModuleType, layout: ParallelLayout) -> list[str]:
    """Everything megatron-core would refuse about running `module`'s model under `layout`, known
    from the module's DIMS and PARAMS before any process starts: positive sizes; TP dividing
    the attention heads, the query groups and every TP-split dimension; expert-TP every expert
    one; EP the experts; the layers over PP and VPP (with uneven first and last stages)."""
    found = size_problems(layout_sizes(layout))
    if found:
        return found
    found += layout.problems()
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
    if getattr(module, "MODEL", "gpt") == "llava":
        from mapgen.verify.llava import llava_layout_problems

        return found + llava_layout_problems(module, layout)
    found += _pipeline_problems(module, layout)
    return found


def _pipeline_problems(module: ModuleType, layout: ParallelLayout) -> list[str]:
    """megatron-core's rules for placing the decoder layers on pipeline stages (its
    TransformerConfig's), in the user's terms."""
    hybrid = getattr(module, "MODEL", "gpt") == "hybrid"
    layers = module.DIMS.num_layers * (2 if hybrid else 1)  # a hybrid layer is half a decoder layer
    what = f"the {layers} {'hybrid layers (two per decoder layer)' if hybrid else 'layers'} of {module.TARGET}"
    pp, vpp, first, last = layout.pp, layout.vpp, layout.first_stage_layers, layout.last_stage_layers
    if hybrid and vpp > 1:
        return [f"--vpp {vpp}: hybrid models have no virtual pipeline stages in mapgen (megatron-core sets them with '|' in the layer pattern)"]
    if vpp > 1 and pp < 2:
        return [f"--vpp {vpp} needs --pp 2 or more (virtual stages interleave pipeline stages; --pp {pp} has one)"]
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


def hf_problems(module: ModuleType, folder: str | Path) -> list[str]:
    """The HF checkpoint in `folder` against the module: config.json's architecture, the
    safetensors headers and index against the module's HF table (verify and convert share it)."""
    from mapgen.compiler.nested import text_architecture_of
    from mapgen.runtime.checkpoint_checks import checkpoint_problems, open_checkpoint

    found: list[str] = []
    config = Path(folder) / "config.json"
    try:
        fields = json.loads(config.read_text(encoding="utf-8"))
    except OSError as exc:
        found.append(f"{config}: cannot read: {exc.strerror}")
    except (UnicodeDecodeError, ValueError) as exc:
        found.append(f"{config}: not JSON: {exc}")
    else:
        architectures = fields.get("architectures") if isinstance(fields, dict) else None
        if not isinstance(fields, dict):
            found.append(f"{config}: a config.json must hold a JSON object")
        elif (
            isinstance(architectures, list) and architectures and module.HF_ARCHITECTURE not in architectures
            # a vision-language model around it (Qwen3.5's published checkpoint): mapgen.compiler.nested
            and not any(text_architecture_of(str(a), module.HF_ARCHITECTURE) for a in architectures)
        ):
            found.append(f"{config}: architectures is {architectures}, {module.TARGET} maps {module.HF_ARCHITECTURE}")
    try:
        checkpoint = open_checkpoint(module, folder)  # as Converter.load reads it
        if (contradiction := quantization_contradiction(checkpoint, config)) is not None:
            return found + [contradiction]  # what follows from it would only repeat it per tensor
        found += [f"{folder}: {problem}" for problem in checkpoint_problems(module, checkpoint)]
    except MapgenError as exc:
        found.append(str(exc))
    return found


def quantization_contradiction(checkpoint: HFCheckpoint, config: Path) -> str | None:
    """config.json's `quantization_config.quant_method` against the tensors the files hold:
    another method (mxfp4) over FP8 tensors with block scales, or fp8 over MXFP4 blocks and no
    FP8 tensor, said once, naming both."""
    from mapgen.runtime.checkpoint import FP8

    quantization = checkpoint.config.get("quantization_config") if isinstance(checkpoint.config, dict) else None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method is None:
        return None
    names = checkpoint.names()
    fp8 = [n for n in names if checkpoint.dtype(n) in FP8]
    scales = checkpoint.scale_names()
    blocks = checkpoint.mxfp4_names() or [n for n in names if n.endswith("_blocks") and checkpoint.dtype(n) == "U8"]
    if method != "fp8" and fp8 and scales:
        return (
            f"{config}: quantization_config.quant_method is {method!r}, but the checkpoint's tensors are FP8 with "
            f"block scales ({len(fp8)} F8 tensors, such as '{fp8[0]}' with '{scales[0]}'): config.json does not "
            "describe these files (an FP8 checkpoint says quant_method 'fp8')"
        )
    if method == "fp8" and blocks and not fp8:
        return (
            f"{config}: quantization_config.quant_method is 'fp8', but the checkpoint holds no FP8 tensor and "
            f"{len(blocks)} MXFP4 ones (such as '{blocks[0]}'): config.json does not describe these files"
        )
    return None


def config_problems(module: ModuleType, spec_path: Path, config_path: Path, ignored: tuple[str, ...] = ()) -> list[str]:
    """`config_path` (the config.json beside the weights) against the module built from
    `spec_path`: the model dims the spec derives from it must be the module's DIMS, or the
    reference transformers builds from it is another model than the one imported. `ignored`:
    the config fields the module was built to accept (`--ignore-config-field`)."""
    from dataclasses import fields as dataclass_fields

    from mapgen.compiler.config import read_hf_config, translate
    from mapgen.common.errors import SpecError
    from mapgen.compiler.spec import parse_spec

    try:
        spec = parse_spec(str(spec_path), spec_path.read_text(encoding="utf-8"))
        config = read_hf_config(str(config_path), config_path.read_text(encoding="utf-8"))
        dims = translate(spec, config, frozenset(ignored))
    except SpecError as exc:
        return list(exc.messages)
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{config_path}: cannot read: {exc}"]
    expressions = {d.name: str(d.expr) if d.expr is not None else repr(d.literal) for d in spec.dims}
    found = []
    for field in dataclass_fields(dims):
        ours, theirs = getattr(dims, field.name), getattr(module.DIMS, field.name)
        if ours != theirs:
            source = f" (dims.{field.name} = {expressions[field.name]} in {spec_path})" if field.name in expressions else ""
            found.append(f"{config_path}: gives {field.name} {ours!r}{source}, but {module.TARGET} was built with {theirs!r}")
    return found


def run_job(job: Job) -> Result:
    """One verification in an initialised process group; every rank returns its Result."""
    from mapgen.runtime import ParallelContext
    from mapgen.runtime.drivers import Converter
    from mapgen.runtime.vocab import padded_vocab_size
    from mapgen.verify.testing import hf_logits, hf_mtp_logits, prepare_cpu_megatron

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
        if module.MODEL == "llava":  # an image and a prompt, not tokens alone
            from mapgen.verify.llava import run_llava_job

            run_llava_job(job, module, chunks, converter, original, result)
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
                result.mismatched.append(name + _unlike(tensor, stored, files.dtype(name), result.dtype))
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


def agree_on_logits(found: torch.Tensor, result: Result, original: HFCheckpoint) -> None:
    """Every rank reaches this collective: `found` (max logit diff, max |pad logit|, tolerance,
    0) becomes the largest of each over all ranks, in `result`. NaN is not ordered (a MAX
    reduction may drop it): it travels as a flag in found[3], and names the checkpoint's
    non-finite tensors."""
    found[3] = float(bool(found[:2].isnan().any()))
    found[:2] = found[:2].nan_to_num(nan=float("inf"))
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    result.max_logit_diff, result.max_pad_logit, result.tolerance = map(float, found[:3])
    if found[3]:
        result.max_logit_diff = float("nan")
        result.nonfinite = nonfinite_tensors(original)


def _unlike(ours: torch.Tensor, theirs: torch.Tensor, stored: str, model: str) -> str:
    """Why an exported tensor cannot equal the stored one whatever the mapping does, or ''."""
    if ours.dtype != theirs.dtype:
        return (
            f" (stored as {stored}, but the model runs in {model}, the checkpoint's most common float dtype, "
            f"so export gives {str(ours.dtype).removeprefix('torch.')}: one tensor of another dtype)"
        )
    if ours.shape != theirs.shape:
        return f" (exported {list(ours.shape)}, stored {list(theirs.shape)})"
    return ""


def same_bits(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Bit for bit: dtype, shape and every byte (NaN equals the same NaN, 0.0 is not -0.0)."""
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return False
    return torch.equal(ours.contiguous().reshape(-1).view(torch.uint8), theirs.contiguous().reshape(-1).view(torch.uint8))


def nonfinite_tensors(checkpoint: HFCheckpoint) -> list[str]:
    """Each float tensor of the checkpoint that holds NaN or inf, with how many such values."""
    found = []
    for name in checkpoint.names():
        tensor = checkpoint.get(name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            counts = ", ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
            found.append(f"{name} ({counts}, {checkpoint.file(name).name})")
    return found


def checkpoint_dtype(checkpoint: HFCheckpoint) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: the most common among its float tensors
    that are not FP8-quantized (a float32 router bias in a bf16 checkpoint does not count)."""
    stored = Counter(
        checkpoint.dtype(n) for n in checkpoint.names() if not checkpoint.quantized(n) and checkpoint.dtype(n) in _FLOATS
    )
    if not stored:
        raise MapgenError(f"{checkpoint.folder}: no float32, bfloat16 or float16 tensor to take the model's dtype from")
    return DTYPES[stored.most_common(1)[0][0]]


def logit_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """How far megatron-core's logits may be from transformers' `reference` logits, both computed
    in `dtype` on the same weights: FLOAT32_TOLERANCE in float32; in a 16-bit dtype,
    HALF_EPSILONS of its epsilons (bfloat16: 2**-7) times the largest reference logit.

    Each forward rounds every matmul, norm and residual sum to the dtype, in its own order, so
    each ends a few epsilons of the logit scale from the exact result. Measured on the bf16
    stand-ins against transformers in float32 on the same weights: megatron-core 0.7 to 1.4 and
    transformers 0.6 to 1.3 epsilons (Llama, Qwen3-MoE); up to 6.3 between the two for Mixtral,
    whose top-2 routing can break a near tie differently. A misplaced shard moves them by far
    more (a wrong column order of one o_proj: about 140); subtler mistakes that bf16 noise hides
    are what the float32 check is for."""
    if dtype == torch.float32:
        return FLOAT32_TOLERANCE
    return float(HALF_EPSILONS * torch.finfo(dtype).eps * reference.abs().max())


Task = tuple[Callable[..., Any], tuple[Any, ...]]


def _worker(rank: int, world_size: int, port: int, tasks: list[Task], queue: Any, timeout_s: float) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(timeout_s, exit=False)  # a hang shows where it waits
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    quiet_libraries()
    torch.set_num_threads(1)
    with native_stdout_silenced():
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = []
    for function, args in tasks:
        try:
            results.append(function(*args))
        except Exception:  # noqa: BLE001 - reported to the parent, which fails loudly
            results.append(TaskFailed(traceback.format_exc()))
    buffer = io.BytesIO()
    torch.save(results, buffer)
    queue.put((rank, buffer.getvalue()))
    dist.barrier()
    dist.destroy_process_group()


@dataclass(frozen=True)
class TaskFailed:
    """A task that raised in a spawned process: its traceback."""

    traceback: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(tasks: list[Task], world_size: int, timeout_s: float = 1800, what: str = "verification") -> dict[int, list[Any]]:
    """Run `tasks` (module-level function, args) in order in `world_size` fresh gloo processes,
    so that many checks share one start-up; every rank's return values, by rank. A process
    that dies, or a run past `timeout_s`, raises here instead of waiting forever, naming `what`
    the processes were doing ("verification", "conversion")."""
    import queue as queue_module
    import time

    context = mp.get_context("spawn")
    results_queue = context.Queue()
    processes = start_processes(  # type: ignore[no-untyped-call, unused-ignore]  # untyped in some torch releases
        _worker,
        args=(world_size, _free_port(), tasks, results_queue, max(timeout_s - 30, 1)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    collected: dict[int, list[Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            try:
                rank, data = results_queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [(rank, p.exitcode) for rank, p in enumerate(processes.processes) if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    reason = ", ".join(map(_death, dead)) if dead else f"no result after {timeout_s:.0f} s"
                    raise MapgenError(f"the {what} processes failed: {reason}") from None
                continue
            collected[rank] = torch.load(io.BytesIO(data), weights_only=False)
        while not processes.join():
            pass
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.kill()
    return collected


def _death(rank_and_code: tuple[int, int]) -> str:
    rank, code = rank_and_code
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rank {rank} killed by {name}" + (" (out of memory?)" if code == -signal.SIGKILL else "")
    return f"rank {rank} exited with code {code}"


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
