"""The `mapgen` command's entry point (also `python -m mapgen`): the CLI when the build extra is
installed, else one line saying how to get it (exit 2) instead of an ImportError traceback."""

from __future__ import annotations

import importlib.util
import sys

# what the CLI and the compiler import, by import name, from pyproject.toml's `build` extra
# (tests/test_runtime_only.py checks the two lists agree)
BUILD_MODULES = ("transformers", "jinja2", "black", "yaml", "click", "rich", "psutil")
MISSING_BUILD = "the mapgen command needs the build extra: pip install 'mapgen[build]'"


def main() -> None:
    missing = [name for name in BUILD_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"{MISSING_BUILD} ({', '.join(missing)} not installed)", file=sys.stderr)
        raise SystemExit(2)
    from mapgen.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
