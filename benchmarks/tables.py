"""Writes the benchmark tables of docs/benchmarks.md (and README.md's headline) from the benchmarks' JSON.

    python benchmarks/tables.py           # rewrite every generated block from benchmarks/*.json
    python benchmarks/tables.py --check   # exit 1, naming the blocks, if a document is out of date

A generated block sits between two marker comments in a Markdown file:

    <!-- tables:begin bridge-default -->
    ...generated: never edit by hand...
    <!-- tables:end -->

The name is KIND-STACK: the table of that kind made from the JSON file that `make bench`
(`make bench STACK=current`) writes for that stack, e.g. `bridge-default` from
benchmarks/results-default.json. Each block starts with the run's date, machine and load, as
recorded in the file ("not recorded" where an older file lacks them). `run_metadata()` is what
the benchmark scripts record for that; they import it from here.

--check also fails when a JSON file that `make bench` writes is present but no block uses it.
Standard library only (target_form.py's own table builder is reused for its tables).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
DOCUMENTS = (ROOT / "docs" / "benchmarks.md", ROOT / "README.md")
STACKS = ("default", "current")
NOT_RECORDED = "not recorded"
BLOCK = re.compile(r"(<!-- tables:begin ([\w.-]+) -->\n)(.*?)(<!-- tables:end -->)", re.S)


def run_metadata() -> dict[str, Any]:
    """When, where and under what load a benchmark ran: the `meta` field of its JSON."""
    cpu = platform.processor() or NOT_RECORDED
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": load,
    }


# ---------------------------------------------------------------- provenance


def _loads(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g} to {high:g}"


def provenance(data: Any) -> tuple[str, str, str]:
    """(date, machine, load) of a benchmark's JSON, in words; NOT_RECORDED where it has none."""
    meta = data.get("meta", {}) if isinstance(data, dict) else {}
    date = meta.get("date") or NOT_RECORDED
    machine = NOT_RECORDED
    if meta.get("platform") or meta.get("cpu"):
        parts = [meta.get("cpu"), f"{meta['cpu_count']} CPUs" if meta.get("cpu_count") else None, meta.get("platform"),
                 f"Python {meta['python']}" if meta.get("python") else None,
                 f"torch {meta['torch']}" if meta.get("torch") else None]
        machine = ", ".join(p for p in parts if p)
    elif isinstance(data, dict) and isinstance(data.get("machine"), str):
        machine = data["machine"]
    elif isinstance(data, dict) and isinstance(data.get("machine"), dict):
        host = data["machine"]
        machine = ", ".join(str(p) for p in (host.get("cpu"), host.get("cores") and f"{host['cores']} cores") if p)
    load = f"load {NOT_RECORDED}"
    start = meta.get("load_average") or meta.get("load_average_start")
    if start:
        load = f"load average {', '.join(f'{x:g}' for x in start)} (1, 5, 15 min) at the start"
        if meta.get("load_average_end"):
            load += f", {', '.join(f'{x:g}' for x in meta['load_average_end'])} at the end"
    elif isinstance(data, dict) and isinstance(data.get("machine"), dict) and "load_average_1min" in data["machine"]:
        load = f"load average {data['machine']['load_average_1min']:g} (1 min) at the start"
    elif isinstance(data, dict) and data.get("conversion") and "load_at_start" in data["conversion"][0]:
        values = [tool[0] for row in data["conversion"] for tool in row["load_at_start"].values()]
        load = f"load average (1 min) {_loads(values)} at the starts of the cases"
    return date, machine, load


def header(source: str, data: Any) -> list[str]:
    date, machine, load = provenance(data)
    return [f"*From `benchmarks/{source}`: date {date}; machine {machine}; {load}.*", ""]


# ---------------------------------------------------------------- helpers


def _n(x: Any) -> str:
    """A recorded number as the JSON holds it ('-' for none)."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:g}" if abs(x) >= 1e-4 or x == 0 else f"{x:.1e}"
    return str(x)


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _x2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def conversion_rows(data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """results-*.json's cases in today's form, and the Bridge releases they hold. An older file
    (one unnamed Bridge release, flat fields) is read into the same form."""
    rows = data["conversion"]
    if rows and "mapgen" in rows[0]:
        releases = sorted({rel for r in rows for rel in r["bridge"]})
        return rows, releases
    release = "(release not recorded)"
    out = []
    for r in rows:
        out.append({
            "model": r.get("model", "llama"), "layers": r["layers"], "experts": r.get("experts"),
            "megatron_params": r["megatron_params"], "layout": r["layout"],
            "mapgen": {"import_s": r["mapgen_import_s"], "export_s": r["mapgen_export_s"],
                       "export_cold_s": r["mapgen_export_cold_s"]},
            "bridge": {release: {"import_s": r["bridge_import_s"], "export_s": r["bridge_export_s"],
                                 "mismatched": r.get("bridge_mismatched")}},
            "speedup": {release: {"import": r["import_speedup"], "export_held": r["export_speedup"],
                                  "export_cold": r["export_cold_speedup"]}},
            "mapgen_export_collectives": r.get("mapgen_export_collectives", {}),
            "tensors_per_export": r.get("tensors_per_export"),
        })
    return out, [release]


def _model(r: dict[str, Any]) -> str:
    name = {"llama": "Llama", "qwen3_moe": "Qwen3-MoE"}.get(r["model"], r["model"])
    size = f"{r['layers']} × {r['experts']} experts" if r.get("experts") else f"{r['layers']}"
    return f"{name} {size} ({r['megatron_params']})"


def _failed(b: dict[str, Any]) -> bool:
    return bool(b.get("export_error") or b.get("import_expert_mismatched") or b.get("mismatched"))


# ---------------------------------------------------------------- results-*.json (run.py)


def bridge_table(data: dict[str, Any]) -> list[str]:
    rows, releases = conversion_rows(data)
    head = ["model (Megatron params)", "layout", "import: mapgen s"]
    head += [f"Bridge {rel} s (×)" for rel in releases]
    head += ["export: mapgen held / fresh s"]
    head += [f"Bridge {rel} s (× held / fresh)" for rel in releases]
    body, notes = [], []
    for r in rows:
        m = r["mapgen"]
        line = [_model(r), r["layout"], _n(m["import_s"])]
        for rel in releases:
            b, s = r["bridge"].get(rel, {}), r["speedup"].get(rel, {})
            mark = " †" if _failed(b) else ""
            line.append(f"{_n(b.get('import_s'))} ({_x(s.get('import'))}){mark}")
        line.append(f"{_n(m['export_s'])} / {_n(m['export_cold_s'])}")
        for rel in releases:
            b, s = r["bridge"].get(rel, {}), r["speedup"].get(rel, {})
            if b.get("export_s") is None:
                line.append("fails †" if _failed(b) else "-")
            else:
                line.append(f"{_n(b['export_s'])} ({_x(s.get('export_held'))} / {_x(s.get('export_cold'))})"
                            + (" †" if _failed(b) else ""))
            if _failed(b):
                what = []
                if b.get("import_expert_mismatched"):
                    what.append(f"{b['import_expert_mismatched']} imported expert weights differ from the checkpoint")
                if b.get("mismatched"):
                    what.append(f"{b['mismatched']} exported tensors differ from the checkpoint")
                if b.get("export_error"):
                    what.append(f"its export raised `{b['export_error']}`")
                notes.append(f"† Bridge {rel}, {_model(r)} {r['layout']}: " + "; ".join(what) + ".")
        body.append(line)
    out = table(head, body)
    for note in notes:
        out += [note, ""]
    checked = [b for r in rows for b in r["bridge"].values() if b.get("mismatched") == 0]
    if checked:
        out += [f"{len(checked)} Bridge runs' exports were compared with the checkpoint byte for byte: "
                f"no tensor differed.", ""]
    facts = []
    for rel in releases:
        b = next((r["bridge"][rel] for r in rows if r["bridge"].get(rel, {}).get("python")), None)
        if b:
            facts.append(f"Bridge {rel} ran with Python {b['python']}, torch {b['torch']}, megatron-core "
                         f"{b['megatron_core']}, transformers {b['transformers']}.")
    repeats = sorted({r["mapgen_repeats"] for r in rows if r.get("mapgen_repeats")})
    bridge_repeats = sorted({r["bridge_repeats"] for r in rows if r.get("bridge_repeats")})
    if repeats:
        facts.append(f"Repeats per case: mapgen {min(repeats)} to {max(repeats)}, Bridge "
                     f"{', '.join(map(str, bridge_repeats))}.")
    return out + ([" ".join(facts), ""] if facts else [])


def sync_table(data: dict[str, Any]) -> list[str]:
    rows, releases = conversion_rows(data)
    if "export_local_s" not in rows[0]["mapgen"]:
        return ["This run's JSON holds no weight-sync mode figures.", ""]
    head = ["model", "layout", "gathered / `export_local` s (×)", "collectives of `export_local`",
            "bf16 export: mapgen / Bridge 0.6.2 s (×)"]
    head += [f"Bridge {rel}, tasks made once s (× vs held)" for rel in releases]
    body = []
    for r in rows:
        m = r["mapgen"]
        local = sum(v for k, v in r.get("mapgen_export_local_collectives", {}).items() if k != "bytes")
        b062, s062 = r["bridge"].get("0.6.2", {}), r["speedup"].get("0.6.2", {})
        line = [_model(r), r["layout"], f"{_n(m['export_s'])} / {_n(m['export_local_s'])} ({_x(r.get('gather_free_speedup'))})",
                str(local), f"{_n(m['export_bf16_s'])} / {_n(b062.get('export_bf16_s'))} ({_x(s062.get('export_bf16'))})"]
        for rel in releases:
            b, s = r["bridge"].get(rel, {}), r["speedup"].get(rel, {})
            held = b.get("export_held_s")
            line.append("fails" if held is None and _failed(b) else
                        f"{_n(held)} ({_x(s.get('export_held_vs_bridge_held_tasks'))})")
        body.append(line)
    return table(head, body)


def first_import_table(data: dict[str, Any]) -> list[str]:
    rows, releases = conversion_rows(data)
    if "import_first_s" not in rows[0]["mapgen"]:
        return ["This run's JSON holds no first-import figures.", ""]
    head = ["model (Megatron params)", "layout", "mapgen s"] + [f"Bridge {rel} s (×)" for rel in releases]
    body = []
    for r in rows:
        line = [_model(r), r["layout"], _n(r["mapgen"]["import_first_s"])]
        for rel in releases:
            b, s = r["bridge"].get(rel, {}), r["speedup"].get(rel, {})
            line.append(f"{_n(b.get('import_first_s'))} ({_x(s.get('import_first'))})")
        body.append(line)
    return table(head, body)


def growth_table(data: dict[str, Any]) -> list[str]:
    found = data.get("growth") or []
    if not found:
        return ["This run's JSON holds no growth figures.", ""]
    if "mapgen_import_s" in found[0]:
        releases = sorted({k.split("_")[1] for g in found for k in g if k.startswith("bridge_")})
        head = ["model", "layout", "layers", "parameters ×", "mapgen import ×", "export held ×", "fresh ×",
                "`export_local` ×"]
        head += [f"Bridge {rel} import × / export ×" for rel in releases]
        body = []
        for g in found:
            line = [g["model"], g["layout"], f"{g['layers'][0]} → {g['layers'][1]}", _n(g["params_ratio"]),
                    _n(g["mapgen_import_s"]), _n(g["mapgen_export_s"]), _n(g["mapgen_export_cold_s"]),
                    _n(g["mapgen_export_local_s"])]
            line += [f"{_n(g.get(f'bridge_{rel}_import_s'))} / {_n(g.get(f'bridge_{rel}_export_s'))}" for rel in releases]
            body.append(line)
        return table(head, body)
    head = ["layout", "parameters ×", "mapgen import ×", "Bridge import ×", "mapgen export ×", "Bridge export ×"]
    body = [[g["layout"], _n(g["params_ratio"]), _n(g["mapgen_import"]), _n(g["bridge_import"]),
             _n(g["mapgen_export"]), _n(g["bridge_export"])] for g in found]
    return table(head, body)


def hardware_table(data: dict[str, Any]) -> list[str]:
    hw = data.get("hardware")
    if not hw:
        return ["This run's JSON holds no hardware figures.", ""]
    head = ["model", "plain `copy_`", "import", "export"]
    body = [[f"Llama, {hw['layers']} layers, {_n(hw['gb'])} GB fp32, one process", f"{_n(hw['copy_gb_s'])} GB/s",
             f"{_n(hw['import_gb_s'])} GB/s ({hw['import_vs_copy']:.0%} of copy)",
             f"{_n(hw['export_gb_s'])} GB/s ({hw['export_vs_copy']:.0%} of copy)"]]
    out = table(head, body)
    counts = []
    rows, _ = conversion_rows(data)
    for r in rows:
        if r["layout"] != "TP1" and r.get("mapgen_export_collectives"):
            calls = ", ".join(f"{v} `{k}`" for k, v in sorted(r["mapgen_export_collectives"].items()) if k != "bytes")
            counts.append([_model(r), r["layout"], calls, _n(r.get("tensors_per_export"))])
    if counts:
        out += table(["model (Megatron params)", "layout", "collectives per export (rank 0)", "HF tensors exported"], counts)
    return out


def headline(data: dict[str, Any]) -> list[str]:
    """README's one sentence: the ranges of mapgen's speed-ups over the newest Bridge release."""
    rows, releases = conversion_rows(data)
    rel = releases[-1]
    ratios: dict[str, list[float]] = {"import": [], "import_first": [], "export_held": [], "export_cold": []}
    for r in rows:
        s = r["speedup"].get(rel, {})
        for key, values in ratios.items():
            if s.get(key) is not None:
                values.append(s[key])
    layouts = ", ".join(dict.fromkeys(r["layout"] for r in rows))

    def span(key: str) -> str:
        return f"{min(ratios[key]):.0f}–{max(ratios[key]):.0f}×"

    date, machine, load = provenance(data)
    first = f" ({span('import_first')} for the first import of a checkpoint in a process)" if ratios["import_first"] else ""
    return [f"Against Megatron-Bridge {rel}, on the same checkpoints and process layouts ({layouts}; "
            f"Llama and Qwen3-MoE stand-ins on CPU), mapgen imports {span('import')} faster{first} and exports "
            f"{span('export_held')} faster with a held converter, {span('export_cold')} with a fresh one "
            f"(`make bench`; date {date}; {machine}; {load})."]


# ---------------------------------------------------------------- the other benchmarks


def build_table(data: Any) -> list[str]:
    rows = data["rows"] if isinstance(data, dict) else data
    head = ["target", "KiB", "lines", "functions", "build s", "cold import s", "warm import s", "`mypy --strict` s"]
    body = [[r["target"], f"{r['bytes'] / 1024:.0f}", _n(r.get("lines")), _n(r["functions"]), _n(r["build_s"]),
             _n(r["cold_import_s"]), _n(r["warm_import_s"]), _n(r.get("mypy_strict_s"))] for r in rows]
    return table(head, body)


def moe_memory_table(data: dict[str, Any]) -> list[str]:
    head = ["stand-in", "checkpoint MiB", "mapgen import: peak RSS above start MiB, s",
            "`load_file`: peak MiB, s", "memory ×, time ×"]
    body = [[f"DeepSeek-V3, {data['layers']} layers × {data['experts']} experts ({data['megatron_params']} parameters, "
             f"{data['hf_tensors']} HF tensors)", _n(data["checkpoint_mib"]),
             f"+{_n(data['import_peak_mib'])}, {_n(data['import_s'])}",
             f"+{_n(data['load_file_peak_mib'])}, {_n(data['load_file_s'])}",
             f"{_x2(_ratio(data['import_peak_mib'], data['load_file_peak_mib']))}, "
             f"{_x2(_ratio(data['import_s'], data['load_file_s']))}"]]
    return table(head, body)


def convert_table(data: dict[str, Any]) -> list[str]:
    settings = data.get("settings", {})
    head = ["model", "layout", "MB", "direction", "mapgen s", "MB/s", "baseline s", "MB/s", "ratio", "build s"]
    body = []
    for r in data["rows"]:
        for direction in ("hf-to-megatron", "megatron-to-hf"):
            d = r[direction]
            body.append([r["model"], r["layout"], f"{r['bytes'] / 1e6:.1f}", direction, _n(d["mapgen_s"]),
                         _n(d["mapgen_mb_s"]), _n(d["baseline_s"]), _n(d["baseline_mb_s"]), _n(d["ratio"]),
                         _n(d["mapgen_build_s"])])
    startup = max((r.get("writer_startup_s") or 0 for r in data["rows"]), default=0)
    out = [f"Float32 stand-ins of {settings.get('layers', '?')} layers, hidden {settings.get('hidden', '?')} "
           f"(the MoE: {settings.get('experts', '?')} experts a layer); slowest rank, best of "
           f"{settings.get('repeat', '?')}. ratio = mapgen's time / the baseline's.", ""]
    out += table(head, body)
    out += [f"megatron-core's torch_dist writer start-up, paid once per process and in neither time: up to {startup:g} s.", ""]
    return out


def export_memory_table(data: dict[str, Any]) -> list[str]:
    pairs = data["rows"]
    first = pairs[0][0]
    out = [f"DeepSeek-V3 stand-in, {data['layers']} layers × {data['experts']} experts ({first['params']} parameters, "
           f"{first['hf_tensors']} HF tensors, {_n(first['exported_mib'])} MiB exported in fp32), {data['layout'].upper()}: "
           f"{_n(first['model_mib'])} MiB of weights per rank. MiB per rank, rank 0 / rank 1.", ""]
    head = ["format", "bucket", "buckets", "bound", "live peak, held", "live peak, cold", "peak RSS above the model",
            "held export s"]
    body = []
    for both in pairs:
        row = both[0]

        def pair(key: str, ranks: list[dict[str, Any]] = both) -> str:
            return " / ".join(_n(b[key]) for b in ranks)

        body.append([row["format"], f"{row['bucket_mib']} MiB", _n(row["buckets"]), f"{_n(row['bound_mib'])} MiB",
                     pair("held_live_mib"), pair("cold_live_mib"), pair("held_rss_mib"),
                     _n(max(b["held_s"] for b in both))])
    return out + table(head, body)


def target_form_tables(data: dict[str, Any]) -> list[str]:
    sys.path.insert(0, str(BENCH))
    import target_form  # noqa: PLC0415  (standard library only at import)

    out = []
    for title, head, rows in target_form.tables(data):
        out += [f"**{title}**", "", *table(head, rows)]
    return out


# ---------------------------------------------------------------- realwidth-*.json (realwidth.py)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _rss(per_rank: list[dict[str, Any]], *keys: str) -> str:
    """Peak RSS per rank in GiB, the largest over `keys` (phases): "rank 0, rank 1"."""
    return ", ".join(f"{max(r.get(k, 0) for k in keys) / 1024:.1f}" for r in per_rank)


def _repeats(data: dict[str, Any]) -> str:
    rounds, repeat = data.get("rounds", 1), data.get("repeat", "?")
    return f"{repeat} repeats" if rounds == 1 else f"{rounds} rounds × {repeat} repeats (mapgen and Bridge alternating)"


def realwidth_table(data: dict[str, Any]) -> list[str]:
    head = ["model (layers)", "layout", "GB bf16", "`copy_` GB/s", "page-cache read s", "import: mapgen s (GB/s, of copy, of read)",
            "Bridge 0.6.2 s (×)", "export: mapgen held / fresh s (of copy)", "collective alone s (of it)",
            "Bridge 0.6.2 s (× held / fresh)", "peak RSS GiB per rank, import: mapgen / Bridge",
            "export: mapgen / Bridge"]  # ranks of one tool separated by commas
    body, notes = [], []
    for r in data["rows"]:
        m, b, s = r["mapgen"]["median_s"], r.get("bridge") or {}, r.get("speedup") or {}
        failed = bool(b.get("error") or b.get("mismatched") or b.get("import_expert_mismatched"))
        mark = " †" if failed else ""
        collective = "-" if m["collective_s"] < 1e-4 else f"{_n(m['collective_s'])} ({_pct(r.get('export_vs_collective'))})"
        line = [f"{r['title']} ({r['layers']})", r["layout"], _n(r["checkpoint_gb"]), _n(r["gb_s"]["copy"]),
                _n(m.get("read_s")),
                f"{_n(m['import_s'])} ({_n(r['gb_s']['import'])}, {_pct(r['import_vs_copy'])}, {_pct(r.get('import_vs_read'))})",
                f"{_n(b.get('import_median_s'))} ({_x2(s.get('import'))}){mark}",
                f"{_n(m['export_s'])} / {_n(m['export_cold_s'])} ({_pct(r['export_vs_copy'])})", collective,
                f"{_n(b.get('export_median_s'))} ({_x2(s.get('export_held'))} / {_x2(s.get('export_cold'))}){mark}",
                f"{_rss(r['mapgen']['peak_rss_mib'], 'import_s')} / {_rss(b['peak_rss_mib'], 'import') if b.get('peak_rss_mib') else '-'}",
                f"{_rss(r['mapgen']['peak_rss_mib'], 'export_s', 'export_cold_s')} / "
                f"{_rss(b['peak_rss_mib'], 'export', 'export_held') if b.get('peak_rss_mib') else '-'}"]
        body.append(line)
        if b.get("error"):
            notes.append(f"† Bridge 0.6.2, {r['title']} {r['layout']}: it failed: `{b['error'].strip().splitlines()[-1]}`.")
        elif failed:
            notes.append(f"† Bridge 0.6.2, {r['title']} {r['layout']}: {b.get('mismatched') or 0} exported tensors and "
                         f"{b.get('import_expert_mismatched') or 0} imported experts differ from the checkpoint.")
    out = table(head, body)
    for note in notes:
        out += [note, ""]
    for skip in data.get("skipped", []):
        out += [f"Not measured: {skip['title']} ({skip['layers']} layers) {skip['layout']}: {skip['reason']}.", ""]
    checked = [r for r in data["rows"] if (r["mapgen"].get("checked") or {}).get("mismatched") == 0]
    other = sorted({(r.get("bridge") or {}).get("exported_in_other_dtype") or 0 for r in data["rows"]} - {0})
    facts = [f"Median of {_repeats(data)}, slowest rank; GB/s = the checkpoint's bytes / the time; "
             f"\"of copy\" = `copy_`'s time / the tool's (above 100%: faster than copying every byte once); "
             f"\"of read\" = the page-cache read's time / import's (the read: as many bytes as the rank's "
             f"parameters hold, read from the checkpoint's files into them with `os.preadv` on import's threads).",
             f"mapgen's exports of {len(checked)} of {len(data['rows'])} cases and Bridge's "
             f"({sum(1 for r in data['rows'] if (r.get('bridge') or {}).get('mismatched') == 0)} cases) were compared "
             f"with the checkpoint byte for byte: no tensor differed."]
    if other:
        facts.append(f"Bridge exported {', '.join(map(str, other))} norm weights per case in float32 (megatron-core keeps "
                     f"them so), the checkpoint's bf16 values exactly.")
    huge = [r["file_huge_pages_mib"] for r in data["rows"] if "file_huge_pages_mib" in r]
    if huge:
        facts.append(f"Before each case the checkpoint's files were dropped from the page cache and read through once "
                     f"(`settle_page_cache`: the cache as a read from disk leaves it, for both tools); the kernel then "
                     f"held {min(huge) / 1024:.1f} to {max(huge) / 1024:.1f} GiB of file pages in 2 MiB folios.")
    return out + [" ".join(facts), ""]


def realwidth_headline(data: dict[str, Any]) -> list[str]:
    """README's short real-width table: seconds and mapgen's speed-up over Bridge 0.6.2."""
    head = ["real widths, bf16", "layout", "import s: mapgen / Bridge 0.6.2 (×)", "of `copy_`",
            "of the page-cache read", "export s: mapgen / Bridge 0.6.2 (×)"]
    body = []
    for r in data["rows"]:
        m, b, s = r["mapgen"]["median_s"], r.get("bridge") or {}, r.get("speedup") or {}
        body.append([f"{r['title']}, {r['layers']} layers, {_n(r['checkpoint_gb'])} GB", r["layout"],
                     f"{_n(m['import_s'])} / {_n(b.get('import_median_s'))} ({_x2(s.get('import'))})",
                     _pct(r["import_vs_copy"]), _pct(r.get("import_vs_read")),
                     f"{_n(m['export_s'])} / {_n(b.get('export_median_s'))} ({_x2(s.get('export_held'))})"])
    date, machine, load = provenance(data)
    return table(head, body) + [f"(`benchmarks/realwidth.py`, median of {_repeats(data)}; date {date}; "
                                f"{machine}; {load}; the real-width table with RSS and the collective's cost: "
                                f"[docs/benchmarks.md](docs/benchmarks.md#real-widths).)"]


def realwidth_profile_table(data: dict[str, Any]) -> list[str]:
    """Where mapgen's time goes (rank 0's cProfile), in every case below 90% of the copy bound."""
    out = []
    for r in data["rows"]:
        profile = r["mapgen"].get("profile") or {}
        for key, ratio in (("import_s", r["import_vs_copy"]), ("export_s", r["export_vs_copy"])):
            if ratio >= 0.9:
                continue
            total = r["mapgen"]["median_s"][key]
            if key not in profile:
                out += [f"{r['title']} {r['layout']}, {key[:-2]}: {_pct(ratio)} of `copy_` (median {_n(total)} s): "
                        f"no profile recorded (`realwidth.py --profile DIR`).", ""]
                continue
            rows = [[f"`{f['function']}`", _n(f["calls"]), _n(f["self_s"]), _n(f["cumulative_s"])]
                    for f in profile[key][:6]]
            out += [f"**{r['title']} {r['layout']}, {key[:-2]}: {_pct(ratio)} of `copy_` (median {_n(total)} s)**", ""]
            out += table(["function (rank 0, one profiled call)", "calls", "self s", "cumulative s"], rows)
    return out or ["Every case reaches 90% of the copy bound: nothing to profile.", ""]


# ---------------------------------------------------------------- blocks

KINDS: dict[str, tuple[str, Callable[[Any], list[str]]]] = {
    "headline": ("results-{stack}.json", headline),
    "bridge": ("results-{stack}.json", bridge_table),
    "sync": ("results-{stack}.json", sync_table),
    "first-import": ("results-{stack}.json", first_import_table),
    "growth": ("results-{stack}.json", growth_table),
    "hardware": ("results-{stack}.json", hardware_table),
    "build": ("build_figures-{stack}.json", build_table),
    "moe-memory": ("moe_memory-{stack}.json", moe_memory_table),
    "convert": ("convert_throughput-{stack}.json", convert_table),
    "export-memory": ("export_memory-{stack}.json", export_memory_table),
    "target-form": ("target_form-{stack}.json", target_form_tables),
    "realwidth": ("realwidth-{stack}.json", realwidth_table),
    "realwidth-headline": ("realwidth-{stack}.json", realwidth_headline),
    "realwidth-profile": ("realwidth-{stack}.json", realwidth_profile_table),
}


def source_of(name: str) -> str:
    kind, _, stack = name.rpartition("-")
    if kind not in KINDS or stack not in STACKS:
        raise SystemExit(f"unknown table block '{name}': KIND-STACK with KIND one of {', '.join(KINDS)} "
                         f"and STACK one of {', '.join(STACKS)}")
    return KINDS[kind][0].format(stack=stack)


def render(name: str) -> str:
    source = source_of(name)
    path = BENCH / source
    if not path.exists():
        raise SystemExit(f"table block '{name}' needs benchmarks/{source}, which does not exist (run `make bench`)")
    data = json.loads(path.read_text())
    kind = name.rpartition("-")[0]
    lines = KINDS[kind][1](data)
    if kind not in ("headline", "realwidth-headline"):
        lines = header(source, data) + lines
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def update(text: str) -> tuple[str, list[str]]:
    """The text with every block regenerated, and the names of its blocks."""
    names: list[str] = []

    def fill(match: re.Match[str]) -> str:
        names.append(match.group(2))
        return match.group(1) + render(match.group(2)) + match.group(4)

    return BLOCK.sub(fill, text), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a document's blocks are out of date")
    args = parser.parse_args()
    stale, used = [], set()
    for document in DOCUMENTS:
        text = document.read_text()
        new, names = update(text)
        used.update(source_of(n) for n in names)
        if new != text:
            stale.append(document.relative_to(ROOT).as_posix())
            if not args.check:
                document.write_text(new)
    unused = sorted(
        path.name for kind in KINDS.values() for stack in STACKS
        if (path := BENCH / kind[0].format(stack=stack)).exists() and path.name not in used
    )
    if args.check:
        problems = [f"{doc} is out of date: run `python benchmarks/tables.py`" for doc in stale]
        problems += [f"benchmarks/{name} has no table in {', '.join(d.name for d in DOCUMENTS)}" for name in unused]
        if problems:
            print("\n".join(problems), file=sys.stderr)
            raise SystemExit(1)
        print("benchmark tables up to date")
        return
    for doc in stale:
        print(f"wrote {doc}")
    for name in unused:
        print(f"benchmarks/{name} has no table block yet", file=sys.stderr)


if __name__ == "__main__":
    main()
