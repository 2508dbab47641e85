"""Nemotron-H stand-ins: the tiny config `mapgen standin` builds for a NemotronHForCausalLM config, and the config.json it writes, in the published form the spec reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# every layer kind, twice the Mamba and expert layers, so that each of two pipeline stages
# (three layers each) has a Mamba layer and an expert layer
STANDIN_PATTERN = "M*EM-E"

# transformers' names of the pattern's symbols (NemotronHConfig.layers_block_type)
_SYMBOLS = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}


def nemotron_standin_fields(tiny: dict[str, Any]) -> dict[str, Any]:
    """`tiny` (testing.standin_config's shrunk fields) with a Mamba-2 mixer that TP 2 splits:
    4 heads of 12 (inner width 48, apart from the hidden size 64), 2 groups of state 16; the
    pattern above; a shared expert of 48."""
    found = dict(tiny)
    found.pop("layers_block_type", None)
    found.update(
        hybrid_override_pattern=STANDIN_PATTERN,
        num_hidden_layers=len(STANDIN_PATTERN),
        mamba_num_heads=4,
        mamba_head_dim=12,
        n_groups=2,
        ssm_state_size=16,
        chunk_size=4,
        moe_shared_expert_intermediate_size=48,
        n_shared_experts=1,
    )
    return found


def write_published_pattern(folder: Path) -> None:
    """transformers 5 saves the pattern as `layers_block_type` (a list of layer types) and no
    `num_hidden_layers`; the published configs (and the spec) have `hybrid_override_pattern` and
    `num_hidden_layers`. Both are added to the saved config.json, the rest kept as saved."""
    path = folder / "config.json"
    fields = json.loads(path.read_text())
    kinds = fields.get("layers_block_type")
    if "hybrid_override_pattern" in fields or not isinstance(kinds, list):
        return
    pattern = "".join(_SYMBOLS[kind] for kind in kinds)
    fields["hybrid_override_pattern"] = pattern
    fields["num_hidden_layers"] = len(pattern)
    # transformers writes its default (0, inf) as [0.0, {"__float__": "Infinity"}], which only its
    # own loader decodes; the published Nano config has no time_step_limit (the same default)
    if fields.get("time_step_limit") == [0.0, {"__float__": "Infinity"}]:
        del fields["time_step_limit"]
    path.write_text(json.dumps(fields, indent=2) + "\n")
