"""Bad specs and configs: every problem reported at once, each as `path:line:col: message`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mapgen.compiler.build import compile_target
from mapgen.common.errors import SpecError

from spec_cases import BASE_CONFIG, BASE_SPEC, CASES


def _write(folder: Path, edits: list[tuple[str, str]], overrides: dict[str, object]) -> None:
    spec = BASE_SPEC
    for old, new in edits:
        assert old in spec, f"edit target not in the base spec: {old!r}"
        spec = spec.replace(old, new, 1)
    config = dict(BASE_CONFIG)
    for key, value in overrides.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "bad.yaml").write_text(spec)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _compile(folder: Path) -> str:
    return compile_target(
        "t", folder / "bad.yaml", folder / "config.json", "te", "test", ("bad.yaml", "config.json")
    )


def test_base_spec_builds(tmp_path: Path) -> None:
    _write(tmp_path, [], {})
    assert "def import_output_layer_weight" in _compile(tmp_path)


def test_there_are_at_least_15_cases() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize(("edits", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_spec_reports_exactly(
    tmp_path: Path, edits: list[tuple[str, str]], overrides: dict[str, object], expected: list[str]
) -> None:
    _write(tmp_path, edits, overrides)
    with pytest.raises(SpecError) as raised:
        _compile(tmp_path)
    assert raised.value.messages == expected
    assert str(raised.value) == "\n".join(expected)
