#!/usr/bin/env python3
"""Print kvmtrace's import graph between its parts, read from the code with ``ast``, and check
the layering rules of docs/INTERFACES.md.

    python3 scripts/import-graph.py            # the graph (one line per arrow) and the check
    python3 scripts/import-graph.py --check    # only the check; exit 1 when a rule is broken

Parts are the package's subpackages and top-level modules (kvmtrace.tracer, kvmtrace.snapshot,
...). Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "kvmtrace"

# Layers, lowest first. A part may import parts of its own layer or below, never above.
LAYERS = [
    ("base", {"consts", "errors", "__init__", "fmt", "output", "signals", "text"}),
    ("model", {"snapshot"}),
    ("producers", {"tracer", "workload"}),
    ("consumers", {"analysis", "dashboard", "exporter"}),
    ("commands", {"commands", "cli", "__main__"}),
]
# Extra rules: (importer part, imported module prefix, why forbidden)
FORBIDDEN = [
    ("analysis", "kvmtrace.tracer", "analysis reads recordings and snapshots, never tracer internals"),
    ("dashboard", "kvmtrace.tracer", "the live view is a pure function of snapshots"),
    ("exporter", "kvmtrace.tracer.", "the exporter consumes snapshots; it may start a session only via kvmtrace.tracer.session"),
    ("workload", "kvmtrace.commands", "the workload runs without the CLI"),
    ("workload", "kvmtrace.cli", "the workload runs without the CLI"),
]
ALLOWED = {("exporter", "kvmtrace.tracer.session")}


def part_of(module: str) -> str:
    """The part a module belongs to. A ``__main__`` module is an entry point (``python -m``):
    it belongs with the commands, whatever package holds it."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "__main__"
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names = names[:-1]
    return ".".join(names)


def resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> list:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if node.module is None:  # from . import x
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def normalize(target: str) -> str:
    """``from kvmtrace import __version__`` names an attribute, not a module: trim a target to
    the longest prefix that is a module of the package."""
    parts = target.split(".")
    while len(parts) > 1 and not _exists(".".join(parts)):
        parts.pop()
    return ".".join(parts)


def imports() -> dict:
    out = defaultdict(set)
    for path in sorted((ROOT / PKG).rglob("*.py")):
        mod = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = resolve(mod, node, path.name == "__init__.py")
            else:
                continue
            for t in targets:
                if t == PKG or t.startswith(PKG + "."):
                    out[mod].add(normalize(t))
    return out


def layer(part: str) -> int:
    for i, (_name, members) in enumerate(LAYERS):
        if part in members:
            return i
    return -1


def check(edges: dict) -> list:
    problems = []
    for src, targets in sorted(edges.items()):
        sp = part_of(src)
        for t in sorted(targets):
            tp = part_of(t)
            if sp == tp:
                continue
            ls, lt = layer(sp), layer(tp)
            if ls < 0 or lt < 0:
                problems.append(f"{src} -> {t}: part not in any layer (add it to LAYERS)")
            elif lt > ls:
                problems.append(f"{src} -> {t}: {LAYERS[ls][0]} imports {LAYERS[lt][0]} above it")
            for who, prefix, why in FORBIDDEN:
                if sp == who and (t == prefix or t.startswith(prefix)) and (sp, t) not in ALLOWED:
                    problems.append(f"{src} -> {t}: {why}")
    return problems


def main(argv) -> int:
    edges = imports()
    if "--check" not in argv:
        part_edges = defaultdict(set)
        for src, targets in edges.items():
            for t in targets:
                if part_of(src) != part_of(t):
                    part_edges[part_of(src)].add(part_of(t))
        print("kvmtrace parts, by layer (lowest first):")
        for name, members in LAYERS:
            print(f"  {name:10} {', '.join(sorted(members))}")
        print("arrows (part -> parts it imports):")
        for src in sorted(part_edges, key=lambda p: (layer(p), p)):
            print(f"  {src:10} -> {', '.join(sorted(part_edges[src], key=lambda p: (layer(p), p)))}")
    problems = check(edges)
    if problems:
        print(f"{len(problems)} layering problem(s):")
        for p in problems:
            print(f"  {p}")
        return 1
    print("layering: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
