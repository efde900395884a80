"""The import rules (README "Layout and import rules"): no import circle anywhere in salm_mtp, and every import,
function-level (lazy) ones included, follows an allowed arrow between layers. Read from the source (ast), nothing is
imported."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "salm_mtp")

LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("salm_mtp", "salm_mtp.errors", "salm_mtp.config", "salm_mtp.malloc", "salm_mtp.mesh", "salm_mtp.metrics",
             "salm_mtp.options", "salm_mtp.lightning_private",
             "salm_mtp.data.tokenizer", "salm_mtp.data.prompt"),  # the token format of a task and its answer:
    # the data writes it, decoding reads it (a CTC transcript becomes an answer in it)
    "data": ("salm_mtp.data",),
    "parts": ("salm_mtp.modules", "salm_mtp.io.weights", "salm_mtp.io.fill", "salm_mtp.materialize", "salm_mtp.linear_ce", "salm_mtp.loss",
              "salm_mtp.generate", "salm_mtp.decoding", "salm_mtp.optim", "salm_mtp.optim_state",
              "salm_mtp.checkpointing", "salm_mtp.resume"),
    "demo": ("salm_mtp.demo",),
    "training": ("salm_mtp.salm", "salm_mtp.model", "salm_mtp.guard", "salm_mtp.live_spec", "salm_mtp.step_metrics", "salm_mtp.objective", "salm_mtp.parallel", "salm_mtp.strategy", "salm_mtp.callbacks",
                 "salm_mtp.provenance", "salm_mtp.io.sharded"),
    "apps": ("salm_mtp.io", "salm_mtp.evaluation", "salm_mtp.plan", "salm_mtp.pretrain", "salm_mtp.trainer_cli",
             "salm_mtp.cli", "salm_mtp.report", "salm_mtp.run_config", "salm_mtp.sweep", "salm_mtp.transcribe"),
}
"""Each module's layer: the longest prefix that names it."""
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "data": {"base", "data"},  # lhotse inputs know nothing of models or training
    "parts": {"base", "parts"},  # model parts, losses, decoding, checkpoint files: nothing of data or training
    "demo": {"base", "data", "demo"},
    "training": {"base", "data", "parts", "training"},
    "apps": {"base", "data", "parts", "demo", "training", "apps"},
}
"""Layer -> the layers its modules may import."""


def modules() -> dict[str, str]:
    """{dotted module name: file} of every module of the package."""
    out = {}
    for d, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports(name: str, path: str, known: dict[str, str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (relative imports resolved)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("salm_mtp") and t != name:
                found.add(t)
    return found


def layer_of(name: str) -> str:
    best = max(((p, layer) for layer, ps in LAYERS.items() for p in ps if name == p or name.startswith(p + ".")),
               key=lambda x: len(x[0]), default=None)
    assert best is not None, f"{name} is in no layer: add it to LAYERS (and the README's import rules)"
    return best[1]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(graph()) == []


def test_every_import_follows_an_allowed_arrow():
    bad = [f"{a} ({layer_of(a)}) -> {b} ({layer_of(b)})" for a, targets in sorted(graph().items())
           for b in sorted(targets) if layer_of(b) not in ALLOWED[layer_of(a)]]
    assert bad == []


def test_the_checker_sees_lazy_imports_and_circles(tmp_path):
    """The walk finds an import inside a function, and a circle of two modules."""
    (tmp_path / "a.py").write_text("def f():\n    from salm_mtp import b\n")
    known = {"salm_mtp.a": str(tmp_path / "a.py"), "salm_mtp.b": ""}
    assert imports("salm_mtp.a", str(tmp_path / "a.py"), known) == {"salm_mtp.b"}
    assert cycles({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y"]]
