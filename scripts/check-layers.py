#!/usr/bin/env python3
"""Checks that dependencies between byok_pg's modules flow down only.

Reads the layer table of ARCHITECTURE.md (the Markdown table whose header is
`layer | module | owns`, top layer first; a row per module, rows of one layer
together), so the document and the check cannot drift apart. Then:

- attributes each file under src/ to its top-level module (src/foo.rs or
  src/foo/...; src/lib.rs is the crate root and may use anything) and finds
  every reference to another module: `crate::foo`, `use crate::{foo, bar::baz}`
  groups (also over several lines) and `super::` paths that climb to the root.
  Comments and string literals are ignored. A module may use modules of its
  own layer or of layers below; it may not use one above (reported with file,
  line, both modules and both layers), and the modules must not form a cycle;
- fails when a module under src/ is missing from the table, or the table names
  one that does not exist;
- checks the pgrx-free crates named in the table (crates/<name>/): no pgrx (nor
  byok_pg) among their dependencies in Cargo.toml or, transitively, in
  Cargo.lock, no `pgrx`/`pg_sys` path in their sources, and no dependency on a
  crate of a layer above (byok-kms may use byok-core, not the reverse).

Usage: python3 scripts/check-layers.py [--root DIR] [--graph]
  --root DIR  the repository to check (default: this script's repository)
  --graph     also print each module's dependencies
Python 3 standard library only. Exit status 0 when everything holds, 1 if not.
"""

import argparse
import os
import re
import sys
from collections import defaultdict

DOC = "ARCHITECTURE.md"
PGRX_PACKAGE = re.compile(r"^(pgrx([-_].*)?|pg[-_]sys|byok[-_]pg)$")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|::|\S")
RAW_STRING = re.compile(r'b?r(#*)"')
CHAR_LITERAL = re.compile(r"'(\\(u\{[0-9A-Fa-f]+\}|x[0-9A-Fa-f]{2}|.)|[^\\'])'", re.S)
WORD = re.compile(r"\w")
INTERESTING = re.compile(r'//|/\*|"|\'|\bb?r#*"|\bb"')


# --- the layer table -----------------------------------------------------------

def read_layers(doc_path):
    """[(layer, [names])] top first, from the `layer | module | owns` table."""
    if not os.path.exists(doc_path):
        sys.exit(f"check-layers: {doc_path} does not exist (it holds the layer table)")
    rows, in_table, fence = [], False, False
    with open(doc_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("```"):
                fence = not fence
            if fence:
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
            if not in_table:
                if cells and [c.lower() for c in cells[:3]] in (
                    ["layer", "module", "owns"], ["layer", "modules", "owns"]
                ):
                    in_table = True
                continue
            if cells is None:
                break
            if all(re.fullmatch(r":?-+:?", c) for c in cells):
                continue
            if len(cells) < 2 or not cells[0]:
                sys.exit(f"check-layers: {doc_path}:{number}: a layer table row needs a layer and a module")
            names = re.findall(r"`([^`]+)`", cells[1]) or [
                n.strip() for n in cells[1].split(",") if n.strip()
            ]
            rows.append((cells[0].strip("*_ "), names, number))
    if not rows:
        sys.exit(f"check-layers: no `layer | module | owns` table in {doc_path}")
    layers, seen = [], {}
    for layer, names, number in rows:
        if layers and layers[-1][0] == layer:
            layers[-1][1].extend(names)
        elif any(layer == name for name, _ in layers):
            sys.exit(f"check-layers: {doc_path}:{number}: layer \"{layer}\" appears twice; keep its rows together")
        else:
            layers.append((layer, list(names)))
        for name in names:
            if name in seen:
                sys.exit(f"check-layers: {doc_path}:{number}: `{name}` is listed twice (also line {seen[name]})")
            seen[name] = number
    return layers


# --- Rust sources --------------------------------------------------------------

def strip_rust(text):
    """The source with comments, strings and char literals blanked (newlines kept)."""
    out, i, n = [], 0, len(text)

    def blank(s):
        return re.sub(r"[^\n]", " ", s)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j])); i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth += 1; j += 2
                elif text.startswith("*/", j):
                    depth -= 1; j += 2
                else:
                    j += 1
            out.append(blank(text[i:j])); i = j
        elif (m := RAW_STRING.match(text, i)) and (i == 0 or not WORD.match(text[i - 1])):
            end = '"' + m.group(1)
            j = text.find(end, m.end())
            j = n if j < 0 else j + len(end)
            out.append(blank(text[i:j])); i = j
        elif c == '"' or (c == "b" and text.startswith('b"', i) and (i == 0 or not WORD.match(text[i - 1]))):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(blank(text[i:j + 1])); i = j + 1
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}', b'x'), or a lifetime ('a).
            m = CHAR_LITERAL.match(text, i)
            if m:
                out.append(blank(m.group(0))); i = m.end()
            else:
                out.append(c); i += 1
        else:
            # Plain code: copy up to the next place a comment or literal may start.
            m = INTERESTING.search(text, i + 1)
            j = m.start() if m else n
            out.append(text[i:j]); i = j
    return "".join(out)


def tokens_of(code):
    """[(token, line)] of blanked source."""
    result, line, last = [], 1, 0
    for m in TOKEN.finditer(code):
        line += code.count("\n", last, m.start())
        last = m.start()
        result.append((m.group(0), line))
    return result


def crate_level_names(toks, i):
    """Names used at the crate root by the path starting at toks[i] (after `crate::`)."""
    if i >= len(toks):
        return []
    tok, line = toks[i]
    if IDENT.fullmatch(tok):
        is_macro = i + 1 < len(toks) and toks[i + 1][0] == "!"
        return [] if tok in ("self", "super", "crate") else [(tok, line, is_macro)]
    if tok != "{":
        return []
    names, depth, expect, j = [], 1, True, i + 1
    while j < len(toks) and depth:
        tok, line = toks[j]
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
        elif tok == "," and depth == 1:
            expect = True
            j += 1
            continue
        elif depth == 1 and expect and IDENT.fullmatch(tok) and tok not in ("self", "super", "crate"):
            names.append((tok, line, False))
        expect = False
        j += 1
    return names


def references(path, module_path):
    """[(top-level name, line, is_macro)] that the file at `path` uses from the crate root."""
    with open(path, encoding="utf-8") as f:
        toks = tokens_of(strip_rust(f.read()))
    found, inline = [], []  # inline: [(mod name, brace depth at its `{`)]
    depth = 0
    for i, (tok, _) in enumerate(toks):
        prev = toks[i - 1][0] if i else ""
        nxt = toks[i + 1][0] if i + 1 < len(toks) else ""
        if tok == "{":
            depth += 1
            if i >= 2 and toks[i - 2][0] == "mod" and IDENT.fullmatch(prev):
                inline.append((prev, depth))
        elif tok == "}":
            if inline and inline[-1][1] == depth:
                inline.pop()
            depth -= 1
        elif tok == "crate" and nxt == "::":
            found += crate_level_names(toks, i + 2)
        elif tok == "super" and nxt == "::" and prev != "::":
            here = list(module_path) + [m for m, _ in inline]
            j = i
            while j + 1 < len(toks) and toks[j][0] == "super" and toks[j + 1][0] == "::":
                here = here[:-1] if here else here
                if not here:
                    found += crate_level_names(toks, j + 2)
                    break
                j += 2
    return found


def source_modules(src):
    """{top-level module: [(file, module path)]} for every file under src/ but lib.rs."""
    modules = defaultdict(list)
    for dirpath, _, files in os.walk(src):
        for name in sorted(files):
            if not name.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), src).split(os.sep)
            if rel == ["lib.rs"]:
                continue
            parts = [p[:-3] if p.endswith(".rs") else p for p in rel]
            if parts[-1] == "mod":
                parts = parts[:-1]
            modules[parts[0]].append((os.path.join(dirpath, name), parts))
    return modules


# --- Cargo ---------------------------------------------------------------------

def cargo_dependencies(manifest):
    """[(dependency name, line)] of every dependency table in a Cargo.toml."""
    deps, section = [], None
    with open(manifest, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"\[+([^\]]+)\]+", line)
            if m:
                section = m.group(1).strip()
                d = re.fullmatch(r"(?:target\..+\.)?(?:dev-|build-)?dependencies\.([A-Za-z0-9_-]+)", section)
                if d:
                    deps.append((d.group(1), number))
                    section = None
                continue
            if section and re.fullmatch(r"(?:target\..+\.)?(?:dev-|build-)?dependencies", section):
                k = re.match(r"([A-Za-z0-9_-]+)\s*=", line)
                if k:
                    package = re.search(r"package\s*=\s*\"([^\"]+)\"", line)
                    deps.append((package.group(1) if package else k.group(1), number))
    return deps


def lock_packages(lockfile):
    """{package name: set of dependency names} from Cargo.lock (all versions merged)."""
    packages, name = defaultdict(set), None
    if not os.path.exists(lockfile):
        return packages
    text = open(lockfile, encoding="utf-8").read()
    for block in text.split("[[package]]")[1:]:
        m = re.search(r'^name = "([^"]+)"', block, re.M)
        if not m:
            continue
        name = m.group(1)
        packages[name]
        d = re.search(r"^dependencies = \[(.*?)\]", block, re.M | re.S)
        if d:
            for entry in re.findall(r'"([^"]+)"', d.group(1)):
                packages[name].add(entry.split()[0])
    return packages


def pgrx_path(lock, start):
    """A dependency chain from `start` to a pgrx package in Cargo.lock, if any."""
    seen, stack = {start}, [[start]]
    while stack:
        chain = stack.pop()
        for dep in sorted(lock.get(chain[-1], ())):
            if PGRX_PACKAGE.match(dep):
                return chain + [dep]
            if dep not in seen:
                seen.add(dep)
                stack.append(chain + [dep])
    return None


# --- the checks ----------------------------------------------------------------

def find_cycles(graph):
    """Strongly connected components of more than one module, as cycles."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop(); on.discard(w); component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in out:
        # A shortest cycle through each module of the component, each reported once.
        for start in sorted(component):
            paths, best = [[start]], None
            while paths and best is None:
                nxt = []
                for p in paths:
                    for w in sorted(graph[p[-1]] & component):
                        if w == start:
                            best = p + [start]
                            break
                        if w not in p:
                            nxt.append(p + [w])
                    if best:
                        break
                paths = nxt
            ring = best[:-1]
            k = ring.index(min(ring))
            best = ring[k:] + ring[:k] + [ring[k]]
            if best not in cycles:
                cycles.append(best)
    return cycles


def main():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=here, help="repository to check")
    parser.add_argument("--graph", action="store_true", help="print each module's dependencies")
    args = parser.parse_args()
    root = os.path.abspath(args.root)
    doc = os.path.join(root, DOC)
    layers = read_layers(doc)
    layer_of, rank = {}, {}
    for r, (layer, names) in enumerate(layers):
        for name in names:
            layer_of[name], rank[name] = layer, r

    errors = []
    rel = lambda p: os.path.relpath(p, root)
    crates = {n for n in layer_of if os.path.isfile(os.path.join(root, "crates", n, "Cargo.toml"))}
    src = os.path.join(root, "src")
    modules = source_modules(src)

    for name in sorted(modules):
        if name not in layer_of:
            where = modules[name][0][0]
            errors.append(f"{rel(where)}: module `{name}` is not in the layer table of {DOC}: "
                          f"add a row saying which layer it belongs to and what it owns")
    for name in sorted(layer_of):
        if name not in modules and name not in crates:
            errors.append(f"{DOC}: the layer table names `{name}`, which is neither a module under src/ "
                          f"nor a crate under crates/")

    # src modules: references between them.
    # downward: the edges within a layer or down; an upward edge is reported as
    # such, and a cycle without one lies within a layer.
    graph, downward, evidence = defaultdict(set), defaultdict(set), {}
    for name, files in sorted(modules.items()):
        graph[name]
        for path, module_path in files:
            for target, line, is_macro in references(path, module_path):
                where = f"{rel(path)}:{line}"
                if target == name:
                    continue
                if target not in modules:
                    if not is_macro:
                        errors.append(f"{where}: `{name}` uses `crate::{target}`, an item of the crate root "
                                      f"(src/lib.rs), which sits above every layer: move it into a module")
                    continue
                evidence.setdefault((name, target), where)
                graph[name].add(target)
                if name in rank and target in rank and rank[target] >= rank[name]:
                    downward[name].add(target)
                elif name in rank and target in rank:
                    errors.append(
                        f"{where}: `{name}` (layer \"{layer_of[name]}\") uses `{target}` "
                        f"(layer \"{layer_of[target]}\"), a layer above it; dependencies flow down only: "
                        f"move what both need down, or have `{target}` call `{name}` instead")
    for cycle in find_cycles(downward):
        steps = ", ".join(f"{a} -> {b} ({evidence[(a, b)]})" for a, b in zip(cycle, cycle[1:]))
        errors.append(f"cycle between modules of layer \"{layer_of[cycle[0]]}\": {' -> '.join(cycle)}: {steps}")

    # The pgrx-free crates.
    lock = lock_packages(os.path.join(root, "Cargo.lock"))
    ident = lambda c: c.replace("-", "_")
    for crate in sorted(crates):
        base = os.path.join(root, "crates", crate)
        manifest = os.path.join(base, "Cargo.toml")
        for dep, line in cargo_dependencies(manifest):
            if PGRX_PACKAGE.match(dep):
                errors.append(f"{rel(manifest)}:{line}: {crate} depends on {dep}; "
                              f"the crates of layer \"{layer_of[crate]}\" stay pgrx-free (tested by plain cargo test)")
            elif dep in rank and rank[dep] < rank[crate]:
                errors.append(f"{rel(manifest)}:{line}: {crate} (layer \"{layer_of[crate]}\") depends on {dep} "
                              f"(layer \"{layer_of[dep]}\"), a layer above it")
        chain = pgrx_path(lock, crate)
        if chain:
            errors.append(f"Cargo.lock: {crate} reaches pgrx through {' -> '.join(chain)}")
        above = [c for c in crates if rank[c] < rank[crate]]
        for dirpath, _, files in os.walk(base):
            if os.sep + "target" in dirpath[len(base):]:
                continue
            for f in sorted(files):
                if not f.endswith(".rs"):
                    continue
                path = os.path.join(dirpath, f)
                toks = tokens_of(strip_rust(open(path, encoding="utf-8").read()))
                flagged = set()
                for i, (tok, line) in enumerate(toks):
                    if tok in ("pgrx", "pg_sys", "byok_pg") and line not in flagged:
                        flagged.add(line)
                        errors.append(f"{rel(path)}:{line}: `{tok}` in {crate}, a pgrx-free crate")
                    for other in above:
                        if tok == ident(other) and i + 1 < len(toks) and toks[i + 1][0] == "::":
                            errors.append(f"{rel(path)}:{line}: {crate} (layer \"{layer_of[crate]}\") uses "
                                          f"{other} (layer \"{layer_of[other]}\"), a layer above it")

    if args.graph:
        for name in sorted(graph):
            print(f"{name} [{layer_of.get(name, '?')}] -> {' '.join(sorted(graph[name])) or '(nothing)'}")
    if errors:
        print(f"FAIL: the layering of {DOC} does not hold:")
        for e in errors:
            print(f"  {e}")
        return 1
    edges = sum(len(v) for v in graph.values())
    print(f"layers hold: {len(modules)} modules in {len(layers)} layers of {DOC}, {edges} dependencies, "
          f"each within its layer or downward, no cycle; {', '.join(sorted(crates))} free of pgrx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
