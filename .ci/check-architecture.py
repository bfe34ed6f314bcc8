#!/usr/bin/env python3
"""Checks the relay crate's module boundaries (docs/architecture.md, "The map"):

- no `sqlx::query*` outside `store/`;
- no dependency circle between top-level modules (read from `crate::…` paths);
- `store/` imports neither `sinks` nor `pipeline`; `sinks/` imports nothing of `pipeline`,
  `store`, `relay` or `cli`.

Prints each violation and exits 1 when there is any.
"""
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "crates/outbox-relay/src"
problems = []

def top_module(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".rs")

def strip_comments(text: str) -> str:
    return "\n".join(l.split("//", 1)[0] for l in text.splitlines())

edges = {}
for path in SRC.rglob("*.rs"):
    text = strip_comments(path.read_text())
    mod = top_module(path)
    if mod in ("lib", "main"):
        continue
    if mod != "store" and re.search(r"sqlx::query", text):
        problems.append(f"{path.relative_to(SRC)}: SQL outside store/ (move the statement to store/)")
    # `crate::x` paths, including grouped `use crate::{a, b::c}` imports.
    targets = set(re.findall(r"crate::([a-z_]+)", text))
    for group in re.findall(r"crate::\{([^}]*)\}", text):
        targets.update(re.findall(r"(?:^|,)\s*([a-z_]+)", group))
    targets.discard(mod)
    targets -= {"Error", "Result"}
    edges.setdefault(mod, set()).update(t for t in targets if (SRC / t).exists() or (SRC / f"{t}.rs").exists())

forbidden = {
    "store": {"sinks", "pipeline", "relay", "cli", "cluster", "http"},
    "sinks": {"pipeline", "store", "relay", "cli", "cluster", "http", "config"},
}
for mod, bad in forbidden.items():
    for t in sorted(edges.get(mod, set()) & bad):
        problems.append(f"{mod} imports {t}")

# Cycles: depth-first search over the module graph.
state = {}
def visit(node, stack):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
        if state.get(nxt) == "open":
            problems.append("dependency circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
        elif nxt not in state:
            visit(nxt, stack)
    stack.pop()
    state[node] = "done"
for node in sorted(edges):
    if node not in state:
        visit(node, [])

# Inside each folder: no circle between its files (`super::x` and `crate::<folder>::x` paths;
# `mod.rs` is the folder itself and may only declare and re-export its files).
files = {}
for path in SRC.rglob("*.rs"):
    rel = path.relative_to(SRC)
    if len(rel.parts) != 2:
        continue
    folder, name = rel.parts[0], rel.parts[1].removesuffix(".rs")
    text = strip_comments(path.read_text())
    if name == "mod":
        # Declarations and re-exports are not dependencies.
        text = "\n".join(l for l in text.splitlines()
                         if not re.match(r"\s*(pub )?mod |\s*pub use", l))
        refs_children = set(re.findall(r"\b([a-z_]+)::", text))
    else:
        refs_children = set()
    refs = set(re.findall(r"super::([a-z_]+)", text)) | refs_children
    refs |= set(re.findall(rf"crate::{folder}::([a-z_]+)", text))
    for group in re.findall(r"super::\{([^}]*)\}", text):
        refs.update(re.findall(r"(?:^|,)\s*([a-z_]+)", group))
    siblings = {f.stem for f in (SRC / folder).glob("*.rs")}
    node = f"{folder}/{name}"
    files[node] = {f"{folder}/{r}" for r in refs if r in siblings and r != name}
    if name != "mod" and (re.search(r"super::[A-Z]", text) or re.search(r"super::\{[^}]*[A-Z]", text)):
        files[node].add(f"{folder}/mod")
edges = files
state = {}
for node in sorted(edges):
    if node not in state:
        visit(node, [])

for p in problems:
    print(p)
if problems:
    sys.exit(1)
print(f"module boundaries hold ({len(edges)} modules, no circle, SQL only in store/)")
