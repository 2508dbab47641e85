"""The README and docs/ hold: benchmark tables match the benchmarks' JSON, every relative link and
anchor resolves, every repository path they name exists, the supported-models tables agree with
specs/targets.yaml and the Makefile's verify-standins layouts, and the docs site builds strictly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
TOP_LEVEL = ("mapgen/", "specs/", "generated/", "tests/", "benchmarks/", "examples/", "templates/", "docs/", ".ci/")
MODEL_CLASS = {"gpt": "GPTModel", "hybrid": "HybridModel", "llava": "LLaVAModel", "mamba": "HybridModel"}

sys.path.insert(0, str(ROOT / "benchmarks"))
import tables  # noqa: E402


# ---------------------------------------------------------------- Markdown reading


def _prose(text: str) -> str:
    """The text without fenced code blocks (their lines kept empty, so line numbers hold)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation but `-` and `_` dropped,
    each space a `-` (mkdocs' toc gives the same for these pages: its build checks that too)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    for line in _prose(text).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def links(text: str) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "", _prose(text))
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", prose)


def broken_links(page: Path, text: str) -> list[str]:
    """The relative links of `text` (the content of `page`) whose file or anchor is missing."""
    broken = []
    for target in links(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target} (no file {where})")
        elif anchor and where.suffix == ".md":
            content = text if where == page else where.read_text()
            if anchor not in anchors(content):
                broken.append(f"{target} (no heading #{anchor} in {where.name})")
    return broken


def repository_paths(text: str) -> set[str]:
    """Repository paths the prose names in code spans: `mapgen/runtime/sync.py`, `specs/llama.yaml`."""
    spans = re.findall(r"`([^`\s]+)`", _prose(text))
    return {s.rstrip(".,:;") for s in spans if s.startswith(TOP_LEVEL) and not re.search(r"[<>*{}$]", s)}


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first table under `## heading`."""
    section = re.split(rf"^#+ {re.escape(heading)}$", _prose(text), maxsplit=1, flags=re.M)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in rows]
    return [r for r in cells[2:]]


# ---------------------------------------------------------------- the benchmark tables


def test_benchmark_tables_match_their_json() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_sees_a_table_edited_by_hand() -> None:
    text = (DOCS / "benchmarks.md").read_text()
    regenerated, names = tables.update(text)
    assert regenerated == text and "bridge-default" in names
    block = re.search(r"<!-- tables:begin bridge-default -->\n(.*?)<!-- tables:end -->", text, re.S)
    assert block is not None
    edited = text.replace(block.group(1), block.group(1).replace("| TP1 |", "| TP8 |", 1))
    assert edited != text and tables.update(edited)[0] == text  # the check would report it, and the rewrite undo it


def test_every_table_says_when_where_and_under_what_load() -> None:
    text = (DOCS / "benchmarks.md").read_text()
    blocks = re.findall(r"<!-- tables:begin ([\w.-]+) -->\n(.*?)<!-- tables:end -->", text, re.S)
    assert len(blocks) >= 10
    for name, body in blocks:
        first = body.splitlines()[0]
        assert first.startswith(f"*From `benchmarks/{tables.source_of(name)}`: date "), (name, first)
        assert "; machine " in first and "load" in first, (name, first)


def test_run_metadata_gives_date_machine_and_load() -> None:
    date, machine, load = tables.provenance({"meta": tables.run_metadata()})
    assert tables.NOT_RECORDED not in (date, machine, load)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", date) and "CPUs" in machine and "load average" in load
    assert tables.provenance([{"target": "x"}]) == ("not recorded", "not recorded", "load not recorded")


def test_an_unknown_block_name_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown table block 'bridge-gpu'"):
        tables.update("<!-- tables:begin bridge-gpu -->\n<!-- tables:end -->\n")


# ---------------------------------------------------------------- links and paths


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text()
    assert links(text) or page.name != "README.md"
    assert broken_links(page, text) == []


def test_the_link_check_can_fail() -> None:
    page = DOCS / "index.md"
    text = "# Top\n\n[a](cli.md#mapgen-build) [b](missing.md) [c](cli.md#no-such-heading) [d](#top) [e](#gone)\n"
    assert broken_links(page, text) == [
        f"missing.md (no file {DOCS / 'missing.md'})",
        "cli.md#no-such-heading (no heading #no-such-heading in cli.md)",
        "#gone (no heading #gone in index.md)",
    ]


def test_slugs_follow_github() -> None:
    assert slug("One HF tensor for a kind's roles") == "one-hf-tensor-for-a-kinds-roles"
    assert slug("`vision_qkv`, a worked example") == "vision_qkv-a-worked-example"
    assert slug("GPTModel or HybridModel") == "gptmodel-or-hybridmodel"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_repository_paths_exist(page: Path) -> None:
    missing = sorted(p for p in repository_paths(page.read_text()) if not (ROOT / p).exists())
    assert missing == [], f"{page.name} names paths that do not exist"


def test_no_development_narrative() -> None:
    """User docs cite no issue items, runs or peers' notes (git history keeps those)."""
    for page in PAGES:
        prose = _prose(page.read_text())
        for pattern in (r"\bissue \d+", r"\brun [12]\b", r"peers\.md", r"\bthis session\b"):
            assert not re.search(pattern, prose, re.I), (page.name, pattern)


# ---------------------------------------------------------------- the supported models


def _targets() -> dict[str, dict[str, object]]:
    targets: dict[str, dict[str, object]] = yaml.safe_load((ROOT / "specs" / "targets.yaml").read_text())["targets"]
    return targets


def _spec(entry: dict[str, object]) -> dict[str, object]:
    spec: dict[str, object] = yaml.safe_load((ROOT / str(entry["spec"])).read_text())
    return spec


def _model(entry: dict[str, object]) -> str:
    """The target's model class: its own `model:`, else its spec's first of `models:` (GPTModel
    where neither says)."""
    models = _spec(entry).get("models") or ["gpt"]
    return str(entry.get("model") or models[0])  # type: ignore[index]


@pytest.mark.parametrize("page", [ROOT / "README.md", DOCS / "models.md"], ids=["README", "models"])
def test_supported_models_table_matches_the_targets(page: Path) -> None:
    rows = table_rows(page.read_text(), "Supported models")
    listed = {name: row for row in rows for name in re.findall(r"`(\w+)`", row[0])}
    targets = _targets()
    assert sorted(listed) == sorted(targets)
    for name, entry in targets.items():
        row = listed[name]
        assert row[1] == _spec(entry)["hf_architecture"], name
        assert row[2].split(" (")[0] == MODEL_CLASS[_model(entry)], name
        on_demand = entry.get("checked_in", True) is False
        assert on_demand == ("*" in row[0] or "on demand" in row[0]), name


def _make_variables() -> dict[str, list[str]]:
    found = {}
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"([A-Z_]+) *[:?]?= *(.*)$", line)
        if match:
            value = match.group(2)
            found[match.group(1)] = re.findall(r'"([^"]*)"', value) if '"' in value else value.split()
    return found


def layout_label(args: str) -> str:
    """A Makefile layout (`--tp 2 --ep 2 --etp 1`) as the tables write it (`TP2×EP2 (ETP1)`)."""
    sizes = dict(re.findall(r"--([a-z-]+) (\d+)", args))
    if "first-stage-layers" in sizes or "last-stage-layers" in sizes:
        return "uneven PP"
    label = "×".join(f"{k.upper()}{sizes[k]}" for k in ("tp", "pp", "vpp", "ep") if k in sizes)
    label = label.replace("PP2×VPP2", "PP2×VPP2")
    if "etp" in sizes:
        label += f" (ETP{sizes['etp']})"
    return label or f"DP{sizes['dp']}"


def test_layout_labels() -> None:
    assert layout_label("--tp 2 --ep 2 --etp 1") == "TP2×EP2 (ETP1)"
    assert layout_label("--pp 2 --dp 2 --first-stage-layers 1") == "uneven PP"
    assert layout_label("--dp 2") == "DP2" and layout_label("--pp 2 --vpp 2 --dp 2") == "PP2×VPP2"


def test_readme_layouts_include_make_verify_standins() -> None:
    """Every layout `make verify-standins` runs a target at is in the README's row for it."""
    make = _make_variables()
    rows = table_rows((ROOT / "README.md").read_text(), "Supported models")
    listed = {name: row for row in rows for name in re.findall(r"`(\w+)`", row[0])}
    groups = [("TARGETS", "LAYOUTS", ""), ("MOE_TARGETS", "MOE_LAYOUTS", ""),
              ("BIASED_MOE_TARGETS", "BIASED_MOE_LAYOUTS", ""), ("HYBRID_TARGETS", "HYBRID_LAYOUTS", "_hybrid"),
              ("GDN_HYBRID_TARGETS", "GDN_HYBRID_LAYOUTS", "_hybrid"), ("LLAVA_TARGETS", "LLAVA_LAYOUTS", ""),
              ("DSA_TARGETS", "DSA_LAYOUTS", ""), ("MAMBA_TARGETS", "MAMBA_LAYOUTS", "")]
    checked = 0
    for targets, layouts, suffix in groups:
        for target in make.get(targets, []):
            verified = [cell.strip() for cell in listed[target + suffix][3].split(",")]
            for args in make[layouts]:
                label = layout_label(args)
                assert any(cell.startswith(label) for cell in verified), (target + suffix, label)
                checked += 1
    assert checked >= 40


# ---------------------------------------------------------------- the site


def test_every_page_is_in_the_site_nav() -> None:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(items: list[object]) -> list[str]:
        out: list[str] = []
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            out += pages(value) if isinstance(value, list) else [str(value)]
        return out

    assert sorted(pages(nav)) == sorted(p.name for p in DOCS.glob("*.md"))


def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "benchmarks" / "index.html").exists()
