"""The layering DESIGN.md §1 asks for, checked on the source: who imports whom, no import
circle, no trainer behind the service, and modules of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("training", "retriever", "app")
# modules allowed past ~400 lines, each because one concept needs the room
LONG_MODULES = {
    "training/trainer.py": "the DuoRec loop with its contrastive views, data-parallel steps and checkpoints",
    "training/ra/finetune/trainer.py": "the fine-tuning loop: schedules, phases, bank rebuilds, usefulness updates",
    "retriever/index.py": "the FAISS index factory and its calibration (retriever/ is owned by the serving work)",
    "retriever/bank.py": "MemoryBank: payload, exclusions, MMR and incremental edits around one index",
    "app/store.py": "one Store interface, its Redis and in-process implementations",
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out[name] = path
    return out


def imports_of(path: Path, known: set[str], *, lazy: bool = False) -> set[str]:
    """The project modules ``path`` imports at module level; with ``lazy``, inside functions too."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if lazy else tree.body):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            names = subs or [node.module]  # `from pkg import module` depends on the module, not pkg
        found |= {n for n in names if n in known}
    return found


def graph(*, lazy: bool = False) -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods), lazy=lazy) for name, path in mods.items()}


def test_layering() -> None:
    for mod, deps in graph().items():
        top = mod.split(".")[0]
        for dep in deps:
            if top == "retriever":
                assert not dep.startswith(("training", "app")), (mod, dep)
            if top == "training":
                assert not dep.startswith("app"), (mod, dep)


def test_no_import_circle() -> None:
    g = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_the_service_imports_no_trainer() -> None:
    """Everything app/ can import, lazily or not, except the command line (``ragrec train``
    runs the trainers by design): no trainer, no stage runner, no ablation."""
    g = graph(lazy=True)
    reach, todo = set(), [m for m in g if m.startswith("app") and m != "app.cli"]
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo += g.get(m, ())
    trainers = {"training.trainer", "training.ra.finetune.trainer", "training.ra.runner", "training.reports.ablation"}
    assert not trainers & reach, sorted(trainers & reach)
    assert {"training.ra.bundle", "training.ra.bank"} <= reach  # the walk does follow the service's imports


def test_modules_stay_readable() -> None:
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > 400}
    assert set(long) <= set(LONG_MODULES), {k: v for k, v in long.items() if k not in LONG_MODULES}
