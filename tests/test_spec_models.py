"""A spec states its megatron-core model classes (`models:`, issue 24, item 6): `mapgen build
--model` and a target's `model` default from it, a class it does not list is refused naming
--model and the spec's line; and `mapgen build SPEC CONFIG` without -o writes generated/<stem>/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mapgen.common.errors import MapgenError, SpecError
from mapgen.compiler.build import choose_model
from mapgen.compiler.targets import read_targets
from mapgen.compiler.spec import parse_spec
from mapgen.verify import testing

from spec_cases import BASE_CONFIG, BASE_SPEC

MAPGEN = [sys.executable, "-m", "mapgen.cli"]


def _spec(models: str | None) -> str:
    return BASE_SPEC + (f"models: {models}\n" if models is not None else "")


def _models_line(text: str) -> int:
    return text.splitlines().index(next(line for line in text.splitlines() if line.startswith("models:"))) + 1


@pytest.mark.parametrize(
    ("models", "given", "built"),
    [(None, None, "gpt"), (None, "llava", "llava"), ("[gpt, hybrid]", None, "gpt"), ("[gpt, hybrid]", "hybrid", "hybrid"),
     ("[hybrid, gpt]", None, "hybrid"), ("llava", None, "llava"), ("[llava]", "llava", "llava")],
)
def test_the_model_class_defaults_from_the_spec(models: str | None, given: str | None, built: str) -> None:
    assert choose_model(parse_spec("bad.yaml", _spec(models)), given) == built


def test_a_class_the_spec_does_not_list_is_refused_naming_model_and_the_line() -> None:
    text = _spec("[gpt, hybrid]")
    with pytest.raises(SpecError) as raised:
        choose_model(parse_spec("bad.yaml", text), "llava")
    assert raised.value.messages == [
        f"bad.yaml:{_models_line(text)}:9: --model llava: spec bad.yaml builds gpt or hybrid (its models); leave "
        "--model out to build gpt, or give --model hybrid"
    ]
    with pytest.raises(MapgenError, match="model must be one of gpt, hybrid, llava, mamba, got 'gpu'"):
        choose_model(parse_spec("bad.yaml", text), "gpu")


@pytest.mark.parametrize("models", ["[]", "[gpt, gpt]", "gpu", "[gpt, [hybrid]]", "{gpt: 1}", "1"])
def test_a_bad_models_key_is_refused_at_its_line(models: str) -> None:
    text = _spec(models)
    with pytest.raises(SpecError) as raised:
        parse_spec("bad.yaml", text)
    (message,) = raised.value.messages
    assert message.startswith(
        f"bad.yaml:{_models_line(text)}:9: 'models' must be one or a list of distinct megatron-core model classes "
        "from gpt, hybrid, llava, mamba (the first is built by default), got "
    )


def test_the_shipped_specs_state_their_classes() -> None:
    stated = {}
    for path in sorted((testing.ROOT / "specs").glob("*.yaml")):
        if path.name != "targets.yaml":
            spec = parse_spec(path.name, path.read_text())
            assert spec.models is not None, path
            stated[path.stem] = spec.models.names
    assert stated.pop("llava") == ("llava",)
    assert stated.pop("gpt_oss") == ("gpt",)
    assert stated.pop("deepseek_v3_2") == ("gpt",)  # DSA: GPTModel on megatron-core 0.19
    assert stated.pop("minimax_m2") == ("gpt",)  # refused (`unsupported`), its rules for GPTModel
    assert stated.pop("nemotron_h") == ("mamba",)  # Mamba-2 layers: HybridModel / MambaModel only
    assert set(stated.values()) == {("gpt", "hybrid")}
    # each target's class is one its spec states: the ones targets.yaml leaves out are the default
    for entry in read_targets(testing.ROOT):
        models = parse_spec(entry.spec, (testing.ROOT / entry.spec).read_text()).models
        assert models is not None and entry.model in models.names
    targets = {entry.name: entry.model for entry in read_targets(testing.ROOT)}
    assert (targets["llava_1_5_7b"], targets["llama3_2_1b"], targets["llama3_2_1b_hybrid"]) == ("llava", "gpt", "hybrid")


def _project(tmp_path: Path, model_line: str) -> Path:
    (tmp_path / "specs").mkdir(parents=True)
    (tmp_path / "specs" / "s.yaml").write_text(_spec("[gpt, hybrid]"))
    (tmp_path / "specs" / "c.json").write_text(json.dumps(BASE_CONFIG))
    (tmp_path / "specs" / "targets.yaml").write_text(
        f"targets:\n  t: {{spec: specs/s.yaml, config: specs/c.json, layout: te{model_line}}}\n"
    )
    return tmp_path


def test_a_target_model_defaults_from_its_spec_and_a_mismatch_is_refused_at_its_line(tmp_path: Path) -> None:
    assert [e.model for e in read_targets(_project(tmp_path / "a", ""))] == ["gpt"]
    assert [e.model for e in read_targets(_project(tmp_path / "b", ", model: hybrid"))] == ["hybrid"]
    with pytest.raises(SpecError) as raised:
        project = _project(tmp_path / "c", ", model: llava")
        read_targets(project)
    column = (project / "specs" / "targets.yaml").read_text().splitlines()[1].index("llava") + 1
    assert raised.value.messages == [
        f"specs/targets.yaml:2:{column}: target 't': model llava: spec specs/s.yaml builds gpt or hybrid (its models, line "
        f"{_models_line(_spec('[gpt, hybrid]'))})"
    ]


def _mapgen(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAPGEN, *args], cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=600)


def test_build_without_output_writes_generated_config_stem(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(_spec("[gpt, hybrid]"))
    (tmp_path / "tiny_llama.json").write_text(json.dumps(BASE_CONFIG, indent=2))
    built = _mapgen(["build", "spec.yaml", "tiny_llama.json", "--layout", "local"], tmp_path)
    assert built.returncode == 0, built.stderr
    assert "wrote 5 of generated/tiny_llama/ (5 files" in built.stderr
    header = (tmp_path / "generated" / "tiny_llama" / "__init__.py").read_text().splitlines()
    assert header[1] == "# Target: tiny_llama (local layout)"  # GPTModel: the spec's first class
    assert header[4] == "# Regenerate: mapgen build spec.yaml tiny_llama.json -o generated/tiny_llama --layout local"
    refused = _mapgen(["build", "spec.yaml", "tiny_llama.json", "--model", "llava"], tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"spec.yaml:{_models_line(_spec('[gpt, hybrid]'))}:9: --model llava: spec spec.yaml builds gpt or hybrid")
    usage = _mapgen(["build", "spec.yaml"], tmp_path)
    assert usage.returncode == 2 and "give SPEC and CONFIG together" in usage.stderr
