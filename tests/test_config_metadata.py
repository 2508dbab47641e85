"""Config fields: tool metadata against architecture (issue 24, item 5). A field no transformers
config class defines (unsloth_version, attn_implementation, transformers.js_config) is accepted
with one note line; one that transformers defines and the spec does not read is refused at its
line; `--ignore-config-field NAME` accepts it, and the module's Regenerate line records it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mapgen.common.errors import MapgenError, SpecError
from mapgen.compiler.build import recorded_ignored_fields
from mapgen.compiler.config import FieldPath, translate
from mapgen.compiler.hfconfig import read_hf_config
from mapgen.compiler.spec import parse_spec
from mapgen.verify import testing

from spec_cases import BASE_CONFIG, BASE_SPEC

TOOL_FIELDS = {"unsloth_version": "2024.9", "attn_implementation": "flash_attention_2", "transformers.js_config": {"dtype": "q4"}}
LLAVA_SPEC = testing.ROOT / "specs" / "llava.yaml"
LLAVA_CONFIG = testing.ROOT / "specs" / "configs" / "llava_1_5_7b.json"


def _translate(fields: dict[str, Any], spec_text: str = BASE_SPEC, ignored: frozenset[str] = frozenset()) -> tuple[Any, list[FieldPath]]:
    metadata: list[FieldPath] = []
    dims = translate(parse_spec("bad.yaml", spec_text), read_hf_config("config.json", json.dumps(fields, indent=2)), ignored, metadata)
    return dims, metadata


def _line(fields: dict[str, Any], key: str) -> int:
    """The line of a top-level key in the config as the tests write it (json.dumps, indent 2)."""
    return next(i for i, text in enumerate(json.dumps(fields, indent=2).splitlines(), 1) if text.startswith(f'  "{key}":'))


def _refused(fields: dict[str, Any], spec_text: str = BASE_SPEC, ignored: frozenset[str] = frozenset()) -> list[str]:
    with pytest.raises(SpecError) as raised:
        _translate(fields, spec_text, ignored)
    return raised.value.messages


def test_tool_fields_are_metadata_and_change_no_dim() -> None:
    plain, none = _translate(BASE_CONFIG)
    dims, metadata = _translate({**BASE_CONFIG, **TOOL_FIELDS})
    assert none == [] and dims == plain
    assert metadata == [("unsloth_version",), ("attn_implementation",), ("transformers.js_config",)]


def test_the_line_is_drawn_by_transformers_own_classes() -> None:
    """The independent truth: transformers' LlamaConfig keeps neither sliding_window nor
    num_experts, but Mistral's and Qwen2-MoE's config classes do, so in a Llama config they are
    architecture too."""
    import transformers

    llama = vars(transformers.LlamaConfig())
    assert "sliding_window" not in llama and "num_experts" not in llama
    assert "sliding_window" in vars(transformers.MistralConfig()) and "num_experts" in vars(transformers.Qwen2MoeConfig())


@pytest.mark.parametrize("field", ["sliding_window", "num_experts"])
def test_an_architecture_field_the_spec_does_not_read_is_refused_at_its_line(field: str) -> None:
    fields = {**BASE_CONFIG, "unsloth_version": "x", field: 8}
    assert _refused(fields) == [
        f"config.json:{_line(fields, field)}:3: config field '{field}' is unknown to spec bad.yaml: no expression of "
        "the spec reads it and its config_fields do not declare it, so the model built would ignore it"
    ]


def test_a_field_inside_a_plain_object_is_architecture() -> None:
    """rope_scaling is a plain object: its fields are part of its meaning, whatever their name."""
    spec = BASE_SPEC.replace("  layernorm_epsilon: rms_norm_eps\n", "  layernorm_epsilon: rms_norm_eps\n  rope_type: default(rope_scaling.rope_type, 'default')\n")
    messages = _refused({**BASE_CONFIG, "rope_scaling": {"rope_type": "default", "unsloth_version": 1}}, spec)
    assert [m.split(": ", 1)[1].split(" is unknown")[0] for m in messages] == ["config field 'rope_scaling.unsloth_version'"]


def test_a_sub_config_field_is_judged_by_its_own_class() -> None:
    spec_text = LLAVA_SPEC.read_text()
    published = json.loads(LLAVA_CONFIG.read_text())
    text_config = {**published["text_config"], "unsloth_version": "x"}
    dims, metadata = _translate({**published, "text_config": text_config}, spec_text)
    assert metadata == [("text_config", "unsloth_version")] and dims == _translate(published, spec_text)[0]
    fields = {**published, "text_config": {**published["text_config"], "sliding_window": 16}}
    (message,) = _refused(fields, spec_text)
    assert "config field 'text_config.sliding_window' is unknown to spec bad.yaml" in message


def test_ignore_config_field_accepts_a_field_but_not_one_the_spec_reads() -> None:
    fields = {**BASE_CONFIG, "sliding_window": 16, "rope_scaling": {"factor": 2.0}}
    plain, _ = _translate(BASE_CONFIG)
    dims, metadata = _translate(fields, ignored=frozenset({"sliding_window", "rope_scaling"}))
    assert dims == plain and metadata == []  # ignored fields are not metadata: the header records them
    assert _refused(fields, ignored=frozenset({"sliding_window", "rope_scaling", "hidden_size"})) == [
        f"config.json:{_line(fields, 'hidden_size')}:3: --ignore-config-field hidden_size: spec bad.yaml reads or "
        "declares config field 'hidden_size', which is never ignored"
    ]


# --- the command line ---

MAPGEN = [sys.executable, "-m", "mapgen.cli"]


def _mapgen(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAPGEN, *args], cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=600)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "llama.yaml").write_text((testing.ROOT / "specs" / "llama.yaml").read_text())
    (tmp_path / "tiny.json").write_text(json.dumps(BASE_CONFIG, indent=2))
    (tmp_path / "tool.json").write_text(json.dumps({**BASE_CONFIG, **TOOL_FIELDS}, indent=2))
    (tmp_path / "arch.json").write_text(json.dumps({**BASE_CONFIG, "sliding_window": 16}, indent=2))
    return tmp_path


def test_build_notes_tool_fields_once_and_writes_the_same_module(folder: Path) -> None:
    plain = _mapgen(["build", "llama.yaml", "tiny.json", "-o", "plain.py", "--name", "m", "--layout", "local"], folder)
    tool = _mapgen(["build", "llama.yaml", "tool.json", "-o", "tool.py", "--name", "m", "--layout", "local"], folder)
    assert plain.returncode == 0 and tool.returncode == 0, plain.stderr + tool.stderr
    assert "note:" not in plain.stderr
    assert [line for line in tool.stderr.splitlines() if line.startswith("note:")] == [
        "note: tool.json: unsloth_version, attn_implementation, transformers.js_config are defined by no "
        "transformers config class: taken for tool metadata, not read"
    ]
    # the module records the config it was built from (its sha256) and nothing else of the fields
    ours = [line for line in (folder / "tool.py").read_text().splitlines() if "tool" not in line]
    theirs = [line for line in (folder / "plain.py").read_text().splitlines() if "tiny" not in line and "plain" not in line]
    assert ours == theirs
    assert not any(name in (folder / "tool.py").read_text() for name in TOOL_FIELDS)


def test_build_refuses_an_architecture_field_and_ignore_config_field_accepts_it(folder: Path) -> None:
    refused = _mapgen(["build", "llama.yaml", "arch.json", "-o", "arch.py", "--layout", "local"], folder)
    line = _line({**BASE_CONFIG, "sliding_window": 16}, "sliding_window")
    assert refused.returncode == 2 and not (folder / "arch.py").exists()
    assert refused.stderr.splitlines() == [
        f"arch.json:{line}:3: config field 'sliding_window' is unknown to spec llama.yaml: no expression of the spec "
        "reads it and its config_fields do not declare it, so the model built would ignore it",
        "hint: transformers defines this field, so mapgen takes it for architecture (docs/config-fields.md); if the "
        "model does not depend on it, build with --ignore-config-field sliding_window",
    ]
    args = ["build", "llama.yaml", "arch.json", "-o", "arch.py", "--layout", "local", "--ignore-config-field", "sliding_window"]
    built = _mapgen(args, folder)
    assert built.returncode == 0, built.stderr
    header = (folder / "arch.py").read_text().splitlines()[4]
    assert header == "# Regenerate: mapgen " + " ".join(args)
    assert recorded_ignored_fields(folder / "arch.py") == ("sliding_window",)
    assert recorded_ignored_fields(folder / "tool.json") == ()  # no header: nothing recorded
    # the header's command rebuilds the module byte for byte
    (folder / "arch.py").rename(folder / "first.py")
    assert _mapgen(header.removeprefix("# Regenerate: mapgen ").split(), folder).returncode == 0
    assert (folder / "arch.py").read_bytes() == (folder / "first.py").read_bytes()


def test_what_rebuilds_a_module_passes_its_ignored_fields_along(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify's and convert's config check and local twin use the fields the module was built to
    accept: a te package built with --ignore-config-field gets its twin, a local one passes the
    check; without the flag recorded, the same config is refused."""
    from mapgen.twin import local_twin

    args = ["--layout", "te", "--ignore-config-field", "sliding_window"]
    assert _mapgen(["build", "llama.yaml", "arch.json", "-o", "te_pkg", *args], folder).returncode == 0
    assert _mapgen(["build", "llama.yaml", "arch.json", "-o", "local_pkg", "--layout", "local", *args[2:]], folder).returncode == 0
    assert recorded_ignored_fields(folder / "te_pkg") == ("sliding_window",)
    said: list[str] = []
    monkeypatch.chdir(folder)  # the spec is found by the name the header records
    te, local, plain = (folder / name / "__init__.py" for name in ("te_pkg", "local_pkg", "plain_pkg"))  # as the CLI gives them
    twin = local_twin(te, folder / "arch.json", tmp_path, said.append, said.append)
    assert twin.is_file() and "# Regenerate:" in twin.read_text()
    assert local_twin(local, folder / "arch.json", tmp_path, said.append, said.append) == local
    assert _mapgen(["build", "llama.yaml", "tiny.json", "-o", "plain_pkg", "--layout", "local"], folder).returncode == 0
    with pytest.raises(MapgenError, match="sliding_window"):
        local_twin(plain, folder / "arch.json", tmp_path, said.append, said.append)


def test_ignore_config_field_names_that_cannot_be_recorded_are_refused(folder: Path) -> None:
    from mapgen.compiler.build import check_ignored_names

    assert check_ignored_names(("a.b", "transformers.js_config", "x-y")) == {"a.b", "transformers.js_config", "x-y"}
    for bad in ("a b", "a;rm", "", ".a", "a..b", "a."):
        with pytest.raises(MapgenError, match="not a config field name mapgen can record"):
            check_ignored_names((bad,))
