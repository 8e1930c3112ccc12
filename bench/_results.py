"""What every benchmark script does with its results: name the command that made them, and
write them as ``<out>.md`` (the table a reader sees) and ``<out>.json`` (the rows)."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def revision() -> str:
    """The commit the benchmark runs on (``+changes`` when tracked files other than the results
    differ from it), or
    ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def command_line() -> str:
    """The command that is running, as a reader would retype it, and the commit it ran on."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv) + f" (on {revision()})"


def write_results(out: str | Path, markdown: str, payload: dict) -> None:
    """Writes ``out.md`` and ``out.json`` (creating the folder); values JSON cannot hold are
    written as their ``str``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not with_suffix: a name with a dot in it ("..._r0.25") would lose what follows the dot.
    out.with_name(out.name + ".md").write_text(markdown)
    out.with_name(out.name + ".json").write_text(json.dumps(payload, indent=1, default=str))
