#!/usr/bin/env python3
"""Module import cycles inside a crate: prints every strongly connected group
of modules that import each other (`use crate::a::...`, `crate::a::` paths,
`super::` from a child module), and exits 1 if there is one.

    python3 scripts/module_cycles.py proxy/src curtail/src app/src

A module is a top-level entry of the crate's src folder (`router.rs`,
`downstream/`); test modules (`#[cfg(test)]` blocks) are skipped, as are doc
comments. ARCHITECTURE.md states the rule this checks.
"""
import os
import re
import sys


def modules(src):
    mods = {}
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry in ("lib.rs", "main.rs"):
            continue
        if entry.endswith(".rs"):
            mods[entry[:-3]] = [path]
        elif os.path.isdir(path):
            files = []
            for root, _, names in os.walk(path):
                files += [os.path.join(root, n) for n in names if n.endswith(".rs")]
            mods[entry] = files
    return mods


def code(path):
    text = open(path, encoding="utf-8").read()
    # Drop `#[cfg(test)] mod tests { ... }` (to the end of file: it is last by house style).
    m = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
    if m:
        text = text[: m.start()]
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))


def edges(src):
    mods = modules(src)
    graph = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            body = code(f)
            for other in re.findall(r"\bcrate::(\w+)", body):
                if other in mods and other != m:
                    graph[m].add(other)
            # `use crate::{a, b::c}` groups
            for group in re.findall(r"\bcrate::\{([^}]*)\}", body):
                for other in re.findall(r"(?:^|[,{\s])(\w+)", group):
                    if other in mods and other != m:
                        graph[m].add(other)
    return graph


def sccs(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def main(srcs):
    bad = False
    for src in srcs:
        cycles = sccs(edges(src))
        for c in cycles:
            print(f"{src}: modules import each other: {', '.join(c)}")
            bad = True
        if not cycles:
            print(f"{src}: no module cycle")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["proxy/src"]))
