"""`mapgen explain`: one parameter of a generated module, in words. The rule that produced it,
what its kind does, its Megatron and HF shapes, and under a parallel layout where it lives and
which slice of which HF tensor each rank holds (`mapgen.runtime.shardmap`), and what export
gathers."""

from __future__ import annotations

import difflib
import hashlib
import re
import textwrap
from pathlib import Path
from types import ModuleType

from mapgen.common.errors import MapgenError
from mapgen.common.layout import stacked_slice
from mapgen.common.parallel import ParallelLayout
from mapgen.runtime.shardmap import HFPiece, ParamShards, RankShard, ShardMap, shard_map

WIDTH = 100
INDENT = " " * 8
MAX_DETAILED = 3  # an HF name feeding more parameters lists them, and explains the first ones only
SPEC_HEADER = re.compile(r"^# Spec: +(.+) sha256:([0-9a-f]{64})$", re.MULTILINE)


class UnknownName(MapgenError):
    """A name that is neither a Megatron parameter nor an HF tensor of the module."""


def _runs(runs: tuple[tuple[int, int], ...]) -> str:
    return " + ".join(f"{start}:{stop}" for start, stop in runs) if runs else "none"


def describe_piece(piece: HFPiece) -> str:
    """`q_proj.weight rows 0:1024`, `gate_up_proj[3] rows 0:384 + 768:1152`, `norm.weight whole`."""
    if piece.whole:
        return f"{piece.label} whole"
    parts = []
    for dim, (runs, size) in enumerate(zip(piece.runs, piece.shape)):
        if runs == ((0, size),):
            continue
        what = {0: "rows", 1: "cols"}.get(dim, f"dim {dim}") if len(piece.shape) > 1 else "elements"
        parts.append(f"{what} {_runs(runs)}")
    return f"{piece.label} " + ", ".join(parts)


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _without_asides(text: str) -> str:
    """`text` without its parenthesised remarks (nested ones too)."""
    kept: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
            if depth == 1 and kept and kept[-1] == " ":
                kept.pop()
        elif char == ")" and depth:
            depth -= 1
        elif not depth:
            kept.append(char)
    return "".join(kept)


def _kind_doc(kind: str, asides: bool) -> str | None:
    """The first sentence of the kind's definition (mapgen.compiler.kinds), without 'Import: '
    and, unless `asides`, without its parenthesised remarks."""
    try:
        from mapgen.compiler.kinds import KINDS
    except ImportError:  # pragma: no cover - the compiler ships with mapgen
        return None
    if kind not in KINDS:
        return None
    first = KINDS[kind].doc.split(". ", 1)[0].rstrip(".") + "."
    return (first if asides else _without_asides(first)).removeprefix("Import: ")


def _described_kind(shards: ParamShards) -> str:
    """The kind as the compiler decided it for this parameter (the functions' docstrings say
    `auto -> column: <rule id>`), or the rule's kind."""
    doc = (getattr(shards.plan.importer, "__doc__", None) or "").strip()
    decided = re.fullmatch(r"(.+): rule \d+\.", doc)
    if decided is not None:
        return decided.group(1)
    return shards.rule.kind if shards.rule.kind != "auto" else f"auto -> {shards.split}"


def spec_location(module: ModuleType, module_file: Path | None, rule_id: str) -> str:
    """`spec.yaml:LINE` of the rule, from the spec the module was built from (its header's
    sha256 must match), or why it is not known."""
    sources = getattr(module, "SOURCES", ())
    if module_file is None or not sources:
        return "spec not known (the module names no spec file)"
    from mapgen.compiler.packaged import module_spec

    try:
        spec = module_spec(module_file, sources[0])
    except MapgenError:
        return f"spec {sources[0]} not found (none with the module's sha256)"
    text = spec.read_text(encoding="utf-8")
    with module_file.open(encoding="utf-8") as header_text:
        header = SPEC_HEADER.search(header_text.read(4096))
    if header is None or hashlib.sha256(text.encode()).hexdigest() != header.group(2):
        return f"spec {sources[0]} not found (none with the module's sha256)"
    try:
        from mapgen.compiler.spec import parse_spec
    except ImportError:  # pragma: no cover - the compiler ships with mapgen
        return f"{spec}: the compiler's spec reader is not available"
    try:
        rules = parse_spec(str(sources[0]), text).rules
    except MapgenError:
        return f"{sources[0]} does not parse"
    for rule in rules:
        if rule.id == rule_id:
            return f"{sources[0]}:{rule.loc.line}"
    return f"{sources[0]} has no rule {rule_id}"


def _rank_lines(shards: ParamShards) -> list[str]:
    group = "etp" if shards.group == "etp" else "tp"
    lines: list[str] = []

    def holders(shard: RankShard) -> str:
        ranks = shard.global_ranks
        if not ranks:
            return ""
        return f" (global rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"

    if shards.replicated:
        everyone = sorted({g for s in shards.shards for g in s.global_ranks})
        who = f"{group} rank 0" if shards.group_size == 1 else f"{group} ranks 0-{shards.group_size - 1}"
        if everyone:
            who += f" (global rank{'s' if len(everyone) > 1 else ''} {', '.join(map(str, everyone))})"
        lines.append(f"  {who}: each the whole parameter")
        lines += [f"    {describe_piece(p)}" for p in shards.shards[0].pieces]
        return lines
    dim = shards.plan.split_dim
    what = {0: "rows", 1: "cols"}.get(dim or 0, f"dim {dim}")
    for shard in shards.shards:
        assert shard.block is not None
        pad = f", {shard.pad_rows} pad rows (zeros)" if shard.pad_rows else ""
        lines.append(f"  {group} rank {shard.rank}{holders(shard)}: Megatron {what} {shard.block[0]}:{shard.block[1]}{pad}")
        lines += [f"    {describe_piece(p)}" for p in shard.pieces]
    return lines


def explain_param(shards: ParamShards, smap: ShardMap, module: ModuleType, module_file: Path | None) -> list[str]:
    plan, rule, layout = shards.plan, shards.rule, smap.layout
    where = [f"layer {plan.layer}"] if plan.layer is not None else []
    if plan.expert is not None:
        where.append(f"expert {plan.expert}")
    lines = [f"{plan.megatron_name}: Megatron {_shape(plan.shape)} {plan.dtype}" + (", " + ", ".join(where) if where else "")]
    lines.append(f"rule:   {rule.id} ({rule.kind}), {spec_location(module, module_file, rule.id)}")
    described = _described_kind(shards)
    gated = rule.qkv is not None and rule.qkv.gate  # the gate's remark is the point then
    meaning = _kind_doc(described.rsplit("-> ", 1)[-1] if described.startswith("auto ->") else rule.kind, gated)
    kind_text = described + (f": {meaning}" if meaning else "")
    lines += textwrap.wrap(kind_text, WIDTH, initial_indent="kind:   ", subsequent_indent=INDENT)
    extras = []
    if rule.qkv is not None and rule.qkv.value_dim is not None:  # gated delta net
        g = rule.qkv
        extras.append(f"{g.groups} key heads of {g.head_dim}, {g.heads} value heads of {g.value_dim}")
    elif rule.qkv is not None:
        g = rule.qkv
        extras.append(f"{g.heads} heads, {g.groups} query groups, head_dim {g.head_dim}" + (", output gate" if g.gate else ""))
    if rule.permute_dims is not None:
        extras.append(f"HF tensor permuted by {list(rule.permute_dims)} first")
    lines += [INDENT + e for e in extras]
    for index, label in enumerate(plan.hf_names):
        base, expert = stacked_slice(label)
        shape = smap.hf_shapes[base]
        shown = _shape(shape) if expert is None else f"{_shape(shape[1:])}, slice {expert} of {base} {_shape(shape)}"
        role = rule.roles[index] if index < len(rule.roles) else "hf"
        lines.append(("HF:     " if index == 0 else INDENT) + f"{label} {shown}" + (f" ({role})" if role != "hf" else ""))
    expert_tp = f", expert-TP {layout.expert_tp}" if module.DIMS.num_moe_experts else ""
    lines.append(f"layout: {layout.label(dp=False)} (dp {layout.dp}{expert_tp}, world size {layout.world_size})")
    owner = shards.owner
    stage = f"pp rank {owner.pp_rank}" + (f", virtual stage {owner.vp_stage}" if layout.vpp > 1 else "")
    lines.append(f"stage:  {stage}, as {shards.local_name}" if shards.local_name != plan.megatron_name else f"stage:  {stage}")
    if shards.ep_rank is not None:
        per_rank = (module.DIMS.num_moe_experts or 0) // layout.ep
        lines.append(f"expert: EP rank {shards.ep_rank}, local expert {shards.local_expert} of {per_rank}")
    for copy, copy_owner in shards.tied_copies:
        at = f"pp rank {copy_owner.pp_rank}" + (f", virtual stage {copy_owner.vp_stage}" if layout.vpp > 1 else "")
        lines.append(f"tied:   {copy} on {at} is a copy, imported from the same HF tensor, not exported")
    if not shards.tied_copies and plan.megatron_name in set(getattr(module, "TIED", {}).values()):
        copies = ", ".join(k for k, v in module.TIED.items() if v == plan.megatron_name)
        lines.append(f"tied:   {copies} is this tensor itself (one pipeline stage: no copy)")
    group = "expert-TP" if shards.group == "etp" else "TP"
    local = _shape(shards.shards[0].shape)
    if shards.replicated:
        lines.append(f"split:  none: every {group} rank holds it whole ({shards.group_size} {group} rank{'s' if shards.group_size > 1 else ''})")
    else:
        if shards.group_size == 1:
            lines.append(f"split:  dim {plan.split_dim} over {group}, of size 1: whole")
        else:
            lines.append(f"split:  dim {plan.split_dim} over {shards.group_size} {group} ranks, {local} each")
    lines += _rank_lines(shards)
    if pad := sum(shard.pad_rows for shard in shards.shards):
        rows = plan.shape[plan.split_dim or 0]
        text = (
            f"the model has {rows + pad} rows: the {rows} HF rows padded to a multiple of "
            f"--make-vocab-size-divisible-by {layout.make_vocab_size_divisible_by} x TP {shards.group_size}, "
            "as Megatron-LM, verify and convert build it"
        )
        lines += textwrap.wrap(text, WIDTH, initial_indent="vocab:  ", subsequent_indent=INDENT, break_on_hyphens=False)
    steps = shards.export.lines()
    if (inverse := _inverse(shards)) is not None:
        steps.insert(1 if steps[0].startswith("all-gather") else 0, inverse)
    lines.append("export: " + steps[0])
    lines += [INDENT + step for step in steps[1:]]
    return lines


def _inverse(shards: ParamShards) -> str | None:
    """What the export function does after the gather, where it is more than taking the tensor."""
    rule, plan = shards.rule, shards.plan
    if rule.kind in ("qkv", "kv") or (rule.kind == "vision_qkv" and len(rule.roles) == 3):
        return f"then split per query group back into {', '.join(rule.roles)}"
    if rule.kind in ("concat_qkv", "vision_qkv"):
        return "then split per query group and joined back into one [Q; K; V]"
    if rule.kind == "gated_mlp":
        if len(plan.hf_names) == 1:  # one [gate; up] tensor, or a stacked-experts slice of one
            return "then each rank's [gate_r; up_r] halved, the gates and the ups joined back into one [gate; up]"
        return "then each rank's [gate_r; up_r] halved, the gates joined into gate, the ups into up"
    if rule.kind == "gdn_in_proj":
        return "then each rank's [q_t; k_t; v_t; z_t; b_t; a_t] split and re-packed per key head into qkvz and ba"
    if rule.kind == "gdn_in_proj_sections":
        return "then each rank's [q_t; k_t; v_t; z_t; b_t; a_t] split, each section's blocks joined, q, k and v into qkv"
    if rule.kind == "mamba_in_proj":
        return "then each rank's [z_t; x_t; B_t; C_t; dt_t] split, each section's blocks joined back into [z; x; B; C; dt]"
    if rule.kind == "mamba_conv1d":
        return "then each rank's [x_t; B_t; C_t] split, each section's blocks joined back into [x; B; C]"
    if rule.kind == "gdn_conv1d":
        return "then each rank's [q_t; k_t; v_t] split, the q, k and v sections joined back into [q; k; v]"
    if rule.kind == "reshape":
        return "then reshaped to the HF shape"
    if rule.kind == "zero_centered_rmsnorm":
        return "then + 1 (HF's scale w is Megatron's 1 + gamma)"
    if rule.permute_dims is not None:
        inverse = [0] * len(rule.permute_dims)
        for position, dim in enumerate(rule.permute_dims):
            inverse[dim] = position
        return f"then permuted by {inverse} (the inverse of permute_dims)"
    return None


def _close(name: str, candidates: list[str]) -> list[str]:
    return difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)


def explain(module: ModuleType, name: str, layout: ParallelLayout, module_file: Path | None = None) -> list[str]:
    """The lines `mapgen explain` prints for `name` (a Megatron parameter, a tied copy, an HF
    tensor, a stacked tensor `X` or its slice `X[i]`) of `module` under `layout`."""
    for needed in ("PARAMS", "RULES", "HF_TENSORS", "DIMS"):
        if not hasattr(module, needed):
            raise MapgenError(f"{getattr(module, 'TARGET', module)}: the module has no {needed} (built by an older mapgen? rebuild it)")
    megatron = {p.megatron_name: p for p in module.PARAMS}
    tied = dict(getattr(module, "TIED", {}))
    note: list[str] = []
    if name in tied and tied[name] != name:  # (the MTP stage's embedding copy keeps the embedding's name)
        note = [f"{name} is a tied copy of {tied[name]} (TIED): the same HF tensor is imported into both", ""]
        name = tied[name]
    if name in megatron:
        smap = shard_map(module, layout, names=[name])
        return note + explain_param(smap.params[name], smap, module, module_file)
    smap = shard_map(module, layout, names=[])
    base, _ = stacked_slice(name)
    hf_names = [t.name for t in module.HF_TENSORS]
    if name in smap.by_hf or (base in smap.hf_shapes and name != base):
        found = list(smap.by_hf.get(name, ()))
        if not found:
            raise UnknownName(f"{name}: {base} has no slice {name[len(base):]} ({smap.hf_shapes[base][0]} experts)")
        smap = shard_map(module, layout, names=found)
        params = [smap.params[n] for n in found]
        shape = smap.hf_shapes[base]
        lines = [f"HF {name} {_shape(shape if base == name else shape[1:])} feeds {len(params)} Megatron parameter{'s' if len(params) > 1 else ''}"]
        if len(params) > 1:
            for p in params:
                ep = f", EP rank {p.ep_rank} expert {p.local_expert}" if p.ep_rank is not None else ""
                lines.append(f"  {p.name} (pp rank {p.owner.pp_rank}{ep})")
        shown = params[:MAX_DETAILED] if len(params) <= MAX_DETAILED else params[:1]
        for p in shown:
            lines += ["", *explain_param(p, smap, module, module_file)]
        if len(shown) < len(params):
            lines += ["", f"({len(params) - len(shown)} more: mapgen explain MODULE <Megatron name> for each)"]
        return lines
    for prefix, why in getattr(module, "IGNORED_HF", {}).items():
        if name.startswith(prefix):
            return [f"HF {name} is not mapped: the module ignores HF tensors under {prefix!r} ({why})"]
    candidates = list(megatron) + list(tied) + hf_names
    close = _close(name, candidates)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownName(f"{name}: neither a Megatron parameter nor an HF tensor of {module.TARGET}{hint}")
