"""`mapgen standin`: a tiny random stand-in of a config's model written to a folder, the config read
as `mapgen build` reads it (a value build refuses is refused here too), written whole or not at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mapgen.common.errors import MapgenError
from mapgen.common.files import share_tree, temporary_folder


def write_mxfp4_standin(config: Path, out: Path, twin: Path) -> None:
    """Turn the stand-in in `out` into its MXFP4 form and write its dequantized twin to `twin`
    (each folder's files replaced whole once both are written)."""
    import shutil

    from mapgen.verify.mxfp4_standin import write_mxfp4_twins

    published = json.loads(config.read_text()).get("quantization_config")
    quantization = published if isinstance(published, dict) and published.get("quant_method") == "mxfp4" else None
    staging = temporary_folder(out.parent, f".{out.name}.mxfp4.", ".tmp")
    try:
        try:
            write_mxfp4_twins(out, staging / "mxfp4", staging / "twin", quantization)
        except ValueError as exc:
            raise MapgenError(f"{config}: cannot write an MXFP4 stand-in: {exc}") from None
        twin.mkdir(parents=True, exist_ok=True)
        share_tree(staging)
        for folder, target in ((staging / "twin", twin), (staging / "mxfp4", out)):
            for item in folder.iterdir():
                os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_standin(config: Path, out: Path, seed: int, dtype: Any, vocab_size: int) -> list[Path]:
    """`mapgen standin`'s work: the folders it created. Any failure leaves nothing behind."""
    import shutil

    from mapgen.compiler.build import input_text, read_input
    from mapgen.compiler.hfconfig import read_hf_config
    from mapgen.verify.testing import save_standin, standin_problems
    from mapgen.compiler.write import make_folders

    shown = str(config)
    hf_config = read_hf_config(shown, input_text(read_input(config, shown), shown))
    fields = hf_config.fields
    problems = standin_problems(fields)
    if problems:
        raise MapgenError(f"{shown}: mapgen standin cannot shrink this config: " + "; ".join(problems))
    read_as_build_reads(hf_config)
    if os.path.lexists(out) and not out.is_dir():
        raise MapgenError(f"cannot write the stand-in into {out}: it is not a folder")
    created = make_folders(out.parent)
    try:
        try:
            staging = temporary_folder(out.parent, f".{out.name}.", ".tmp")
        except OSError as exc:
            raise MapgenError(f"cannot write the stand-in into {out}: {exc.strerror}") from None
        try:
            try:
                save_standin(fields, staging, seed, dtype=dtype, vocab_size=vocab_size)
            except OSError as exc:
                raise MapgenError(f"cannot write the stand-in into {out}: {exc.strerror or exc}") from None
            except Exception as exc:  # transformers' verdict on a config it cannot build
                raise MapgenError(
                    f"{shown}: transformers cannot build a stand-in of this config: {type(exc).__name__}: "
                    + (str(exc).strip().splitlines() or ["(no message)"])[0][:300]
                ) from None
            share_tree(staging)  # readable by others as the umask allows, as save_pretrained's files are
            if not out.exists():
                staging.rename(out)
            else:  # an existing folder: each file replaced whole
                for item in staging.iterdir():
                    os.replace(item, out / item.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        for folder in reversed(created):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return created


# the config fields a stand-in replaces by its own (mapgen.verify.testing.standin_config): each,
# where the config has it, must be what build takes (a positive integer), not replaced silently
SHRUNK_COUNTS = ("num_hidden_layers", "num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size",
                  "num_experts_per_tok", "intermediate_size", "vocab_size")


def read_as_build_reads(config: Any) -> None:
    """Refuse what `mapgen build` refuses of `config` (an HFConfig), though the stand-in replaces
    those values: the dims the family's spec reads from it (`translate`, as build evaluates
    them; fields the spec does not read are not build's concern here), and the counts it shrinks."""
    from dataclasses import replace

    from mapgen.common.errors import SpecError
    from mapgen.compiler.config import spec_reads, translate
    from mapgen.compiler.spec import parse_spec
    from mapgen.verify.testing import _family_spec

    fields = config.fields
    wrong = [
        f"{config.where(name)}: config field '{name}' is {json.dumps(fields[name])}: build takes a positive integer"
        for name in SHRUNK_COUNTS
        if name in fields and fields[name] is not None
        and (isinstance(fields[name], bool) or not isinstance(fields[name], int) or fields[name] < 1)
    ]
    model_type = fields.get("model_type")
    spec_path = _family_spec(model_type) if isinstance(model_type, str) else None
    if spec_path is not None:
        from mapgen.compiler.build import display_path

        spec = parse_spec(display_path(spec_path), spec_path.read_text(encoding="utf-8"))
        known = spec_reads(spec) | {entry.path for entry in spec.config_fields}
        unread = frozenset(n for n in fields if not any(k == n or k.startswith(n + ".") for k in known))
        try:  # as the spec's architecture: a config of another one is a stand-in's business
            translate(spec, replace(config, architectures=(spec.hf_architecture,)), unread)
        except SpecError as exc:
            wrong = exc.messages  # build's own words, which name the same fields
    if wrong:
        raise SpecError(wrong)
