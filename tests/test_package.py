"""Target packages: the same plan as the one-file module, bounded files, views over some parts,
and a module of the older form refused with the instruction to rebuild it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mapgen.compiler.build import compile_package, compile_target
from mapgen.compiler.targets import read_targets
from mapgen.compiler.write import write_package
from mapgen.runtime import package as packages
from mapgen.runtime.drivers import Converter
from mapgen.runtime.module_check import module_problems, ModuleArgumentError
from mapgen.verify import testing

TARGETS = {entry.name: entry for entry in read_targets(testing.ROOT)}
BOUND = 4 * 2**20  # the most bytes a generated file may hold


def _both_forms(tmp_path: Path, target: str, experts_per_part: int = 2, label: str = "") -> tuple[Any, Any]:
    """The stand-in of `target` built as one module and as a package (experts cut in twos)."""
    entry = TARGETS[target]
    folder = tmp_path / "hf"
    testing.save_standin(json.loads((testing.ROOT / entry.config).read_text()), folder)
    spec, config = testing.ROOT / entry.spec, folder / "config.json"
    one = tmp_path / "one.py"
    one.write_text(compile_target("one", spec, config, "local", "test"))
    write_package(tmp_path / "pkg", compile_package("pkg", spec, config, "local", "test", experts_per_part=experts_per_part))
    return (
        testing.import_module_from_path(one, f"one_{target}{label}"),
        testing.import_module_from_path(tmp_path / "pkg", f"pkg_{target}{label}"),
    )


@pytest.mark.parametrize("target", ["qwen3_30b_a3b", "deepseek_v3", "llama3_2_1b"])
def test_a_package_holds_the_one_file_modules_plan(tmp_path: Path, target: str) -> None:
    """Every parameter's plan (name, shape, dtype, split, layer, expert, rule, HF tensors) and
    the HF table in HF order are the one-file module's; the functions compute the same."""
    one, pkg = _both_forms(tmp_path, target)
    whole = packages.whole_view(pkg)
    fields = ("megatron_name", "shape", "dtype", "split_dim", "expert_parallel", "layer", "expert", "rule", "hf_names")

    def rows(params: Any) -> list[tuple[Any, ...]]:
        return sorted(tuple(getattr(p, f) for f in fields) for p in params)

    assert rows(whole.PARAMS) == rows(one.PARAMS)
    assert [(t.name, t.shape, t.float32) for t in whole.HF_TENSORS] == [(t.name, t.shape, t.float32) for t in one.HF_TENSORS]
    assert pkg.RULES == one.RULES and pkg.DIMS == one.DIMS and pkg.TIED == one.TIED
    assert pkg.PARAMS == whole.PARAMS  # the package's own attributes read the whole view
    assert sum(p.params for p in pkg.PARTS) == len(one.PARAMS) and sum(p.hf_tensors for p in pkg.PARTS) == len(one.HF_TENSORS)
    # the export functions of both forms give the same tensors for the same shards
    generator = torch.Generator().manual_seed(0)
    for plan in one.PARAMS[:40]:
        parts = [torch.randn(plan.shape, generator=generator)]
        ours, theirs = whole.EXPORTS[plan.megatron_name](parts), one.EXPORTS[plan.megatron_name](parts)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_rank_views_import_only_their_parts(tmp_path: Path) -> None:
    """A view over the layers and experts of one rank imports those parts and the ones outside
    the decoder; its tables are exactly those parts' rows."""
    one, pkg = _both_forms(tmp_path, "qwen3_30b_a3b", label="_views")
    loaded = lambda: {n.split(".", 1)[1] for n in sys.modules if n.startswith(f"{pkg.__name__}.")}  # noqa: E731
    assert loaded() == set()  # importing the package reads no part
    experts = pkg.DIMS.num_moe_experts
    view = packages.rank_view(pkg, [0], (0, experts // 2))
    chosen = {p.module for p in view.parts}
    assert loaded() == chosen
    assert chosen == {p.module for p in pkg.PARTS if p.layer in (None, 0) and (p.experts is None or p.experts[0] < experts // 2)}
    assert {p.megatron_name for p in view.PARAMS} == {
        p.megatron_name for p in one.PARAMS
        if (p.layer in (None, 0)) and (p.expert is None or p.expert < experts // 2)
    }
    assert view.partial and view.HF_COUNT == len(one.HF_TENSORS)
    assert packages.rank_view(pkg, [0], (0, experts // 2)) is view  # made once


def test_checked_in_targets_are_bounded_packages() -> None:
    """No generated file is over 4 MB, every checked-in target is a package whose PARTS name
    exactly its files, and no one-file module of the older form is left in generated/."""
    generated = testing.ROOT / "generated"
    assert not [p.name for p in generated.glob("*.py") if p.name != "__init__.py"]
    for entry in TARGETS.values():
        folder = generated / entry.name
        if not entry.checked_in:
            assert not folder.exists(), entry.name
            continue
        files = sorted(p.name for p in folder.glob("*.py"))
        assert files, entry.name
        assert max(p.stat().st_size for p in folder.glob("*.py")) <= BOUND
        text = (folder / "__init__.py").read_text()
        parts = [line.split('"')[1] for line in text.splitlines() if line.startswith('    PartPlan("')]
        assert sorted([f"{p}.py" for p in parts] + ["__init__.py"]) == files, entry.name


def test_a_module_of_the_older_form_is_told_to_rebuild(tmp_path: Path) -> None:
    """A one-file module as mapgen wrote it before packages (git 9b11921's llama3_2_1b.py): the
    Converter refuses it, naming the form and the command."""
    try:
        old = subprocess.run(
            ["git", "show", "9b11921:generated/llama3_2_1b.py"], cwd=testing.ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        old = None
    if old is None:  # a clone without that history: the older form's tell-tale lines
        one = compile_target("old", testing.ROOT / "specs/llama.yaml", testing.ROOT / "specs/configs/llama3_2_1b.json", "te", "test")
        old = one.replace("FORMAT: Final = 2\n", "")
    path = tmp_path / "old_llama.py"
    path.write_text(old)
    module = testing.import_module_from_path(path, "old_llama_form")
    assert module_problems(module) == [
        "was generated by an older mapgen (its form is 1, this runtime reads form 2): rebuild it with this mapgen "
        "(mapgen build, or the command in its header)"
    ]
    with pytest.raises(ModuleArgumentError, match="older mapgen"):
        Converter(module, [])
