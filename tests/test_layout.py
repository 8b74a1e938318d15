"""The process boundaries, as imports: a worker loads nothing of the coordinator or the
lab, `common/` imports neither side, nothing of the fleet imports the lab or `ops/`."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# What a worker process imports before it serves: its CLI, its tasks and engines, and
# the run config it loads (all of its sections).
WORKER = """
import json, sys
import cord.workers.cli, cord.workers.tasks, cord.workers.engines.hf
from cord.common.config import load_config
load_config(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("cord."))))
"""


def test_a_worker_loads_nothing_of_the_coordinator_or_the_lab():
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(ROOT / "examples" / "demo.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    modules = json.loads(done.stdout)
    assert "cord.workers.cli" in modules and "cord.common.config" in modules
    assert [m for m in modules if m.startswith(("cord.coordinator", "cord.lab"))] == []


def imports_of(folder: str) -> dict[str, set[str]]:
    """Every `cord.*` module each file under `folder` imports, at any depth."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        found[str(path.relative_to(ROOT))] = {n for n in names if n.startswith("cord.")}
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("common", ("cord.coordinator", "cord.workers", "cord.lab", "cord.ops")),
        ("workers", ("cord.coordinator", "cord.lab", "cord.ops")),
        ("coordinator", ("cord.workers", "cord.lab", "cord.ops")),
    ],
)
def test_the_rooms_import_only_what_they_may(folder: str, forbidden: tuple[str, ...]):
    wrong = {
        path: sorted(n for n in names if n.startswith(forbidden))
        for path, names in imports_of(folder).items()
    }
    assert {path: names for path, names in wrong.items() if names} == {}


CITED = re.compile(
    r"[`(\[]((?:common|workers|coordinator|lab|ops|tests|docs|examples|models)/[\w./-]+)"
)


def test_every_file_the_readme_and_docs_cite_exists():
    """A path in backticks or a link in the README or docs/ that names a file of this
    repository (one of its folders, then a name with a suffix) is there. (CHANGELOG.md
    names the files of its day.)"""
    cited: set[str] = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in CITED.finditer(doc.read_text(encoding="utf-8")):
            path = match.group(1).split("#")[0].rstrip(".,:;")
            if not any(c in path for c in "*<>") and Path(path).suffix:
                cited.add(path)
    assert len(cited) > 10
    assert sorted(p for p in cited if not (ROOT / p).exists()) == []


def test_nothing_cites_a_document_outside_the_repository():
    """The method and the runtime facts the code relies on are in docs/method.md."""
    # The two notes this project was started from, named without spelling them out here.
    outside = re.compile("|".join(["cord" + r"-method\.md", "runtime" + "-facts"]))
    files = [*ROOT.glob("*.md"), *ROOT.glob("Makefile")]
    for folder in ("common", "workers", "coordinator", "lab", "ops", "docs", "examples"):
        files += [
            p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".yaml", ".sh"}
        ]
    assert [str(p.relative_to(ROOT)) for p in files if outside.search(p.read_text())] == []
