#!/usr/bin/env python3
"""Module-level import cycles inside each crate of the workspace.

Rule: no module of the workspace imports a module that imports it back (directly or
through other modules of the same crate). A module is a file module or an inline
`mod name { ... }` block (`mod tests` included); the crate root counts as module `crate`.

Edges (module A -> module B, both in the same crate):
  * any `use` in A (`pub` or not, nested groups, `self`/`super`/`crate`/relative paths,
    globs: `use super::*` is an edge to the parent), and any path in A's code or attributes
    such as `crate::a::b::f()`, `super::X`, `self::c::Y`, `child::f()`;
  * each path resolves to the longest prefix that names a module; a name that is not a
    module or an item of that module is looked up among its imports (`use x::Name`,
    `use x::Name as Other`, chains of them), then its glob imports, so `crate::Name` with
    `pub use store::Name;` in lib.rs is an edge to `store`;
  * not edges: a `mod child;` declaration alone, references to the module itself,
    extern crates (`std::`, `tracktrace_core::`, ...: cross-crate cycles cannot exist).
Comments, doc comments and string/char literals are skipped; `#[cfg]` is ignored (every
configuration is checked); `#[path = "..."]` on `mod` is honoured.

Every strongly connected component with more than one module is a cycle; for each one the
script prints its modules and the shortest cycle through each of its edges, with the
file:line of one import per edge. Exit status 1 if any cycle exists.

Run:  python3 .ci/module_cycles.py [--root DIR] [--crate NAME] [--verbose] [--self-test]
"""
from __future__ import annotations

import argparse, fnmatch, os, re, sys, tempfile, tomllib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------- lexer
TOKEN_RE = re.compile(r"""
    (?P<ws>\s+) | (?P<line>//[^\n]*) | (?P<block>/\*)
  | (?P<raw>(?:br|cr|r)(?P<h>\#*)") | (?P<str>[bc]?"(?:\\.|[^"\\])*")
  | (?P<char>b?'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]*\}|.)|[^'\\\n])')
  | (?P<life>'[A-Za-z_]\w*) | (?P<ident>(?:r\#)?[A-Za-z_]\w*)
  | (?P<num>\d[\w]*(?:\.\d[\w]*)?) | (?P<path>::) | (?P<punct>.)
""", re.X | re.S)


@dataclass
class Tok:
    kind: str   # 'ident', 'p' (punctuation), 'lit'
    text: str
    line: int


def lex(src: str) -> list[Tok]:
    toks, pos, line = [], 0, 1
    while pos < len(src):
        m = TOKEN_RE.match(src, pos)
        kind, text = m.lastgroup, m.group()
        if kind == "block":                       # nested /* */ comments
            depth, end = 1, pos + 2
            while depth and end < len(src):
                if src.startswith("/*", end): depth, end = depth + 1, end + 2
                elif src.startswith("*/", end): depth, end = depth - 1, end + 2
                else: end += 1
            text = src[pos:end]
        elif kind == "raw":                       # r"..", r#".."#, br##".."## ...
            close = '"' + m.group("h")
            end = src.find(close, m.end())
            text = src[pos:(len(src) if end < 0 else end + len(close))]
        if kind in ("ident", "path", "punct"):
            toks.append(Tok("ident" if kind == "ident" else "p", text.removeprefix("r#"), line))
        elif kind in ("str", "raw", "char", "num"):
            toks.append(Tok("lit", text, line))
        line += text.count("\n")
        pos += len(text)
    return toks


# ---------------------------------------------------------------------------- model
ITEM_KW = {"fn", "struct", "enum", "union", "trait", "type", "const", "static"}
NOT_NAMES = {"fn", "mut", "unsafe", "async", "extern", "_"}


@dataclass(eq=False)
class Module:
    path: tuple[str, ...]
    file: Path
    parent: Module | None
    children: dict[str, Module] = field(default_factory=dict)
    items: set[str] = field(default_factory=set)
    binds: dict[str, list[str]] = field(default_factory=dict)   # name -> use path
    globs: list[list[str]] = field(default_factory=list)
    refs: list[tuple[list[str], int]] = field(default_factory=list)  # (path, line)

    @property
    def name(self) -> str:
        return "::".join(self.path) or "crate"


def parse_use_tree(toks, i, prefix, out):
    """Parse one use tree at toks[i]; append (segments, alias, glob, line); return next i."""
    segs = list(prefix)
    while i < len(toks):
        t = toks[i]
        if t.text == "{":
            i += 1
            while i < len(toks) and toks[i].text != "}":
                j = parse_use_tree(toks, i, segs, out)
                i = j + 1 if j < len(toks) and toks[j].text == "," else max(j, i + 1)
            return i + 1
        if t.text == "*":
            out.append((segs, None, True, t.line))
            return i + 1
        if t.text == "::":
            segs = segs or ["::"]                 # leading `::` = extern crate
            i += 1
            continue
        if t.kind != "ident":
            return i
        segs = segs + [t.text]
        i += 1
        if i < len(toks) and toks[i].text == "::":
            continue
        alias = None
        if i + 1 < len(toks) and toks[i].text == "as":
            alias, i = toks[i + 1].text, i + 2
        if segs[-1] == "self":
            segs = segs[:-1]
        out.append((segs, alias, False, t.line))
        return i
    return i


def mod_file(base: Path, name: str) -> Path | None:
    for p in (base / f"{name}.rs", base / name / "mod.rs"):
        if p.is_file():
            return p
    return None


class Crate:
    def __init__(self, label: str, root_file: Path):
        self.label, self.modules, self.warnings = label, [], []
        self.root = self._load(root_file, (), None, owns_dir=True)

    def _load(self, file: Path, path, parent, owns_dir) -> Module:
        mod = Module(path, file, parent)
        self.modules.append(mod)
        try:
            toks = lex(file.read_text(encoding="utf-8"))
        except OSError as e:
            self.warnings.append(f"cannot read {file}: {e}")
            return mod
        base = file.parent if owns_dir else file.parent / file.stem
        # stack of (module, brace depth of its body, dir for its `mod x;` children)
        stack, depth, pending_path, i = [(mod, 0, base)], 0, None, 0
        while i < len(toks):
            t, cur, body, cdir = toks[i], *stack[-1]
            prev = toks[i - 1].text if i else ""
            nxt = toks[i + 1] if i + 1 < len(toks) else Tok("p", "", t.line)
            if t.text == "{":
                depth += 1
            elif t.text == "}":
                depth -= 1
                if depth < body:
                    stack.pop()
            elif t.text == ";":
                pending_path = None
            elif t.text == "#" and [x.text for x in toks[i + 1:i + 4]] == ["[", "path", "="]:
                pending_path = toks[i + 4].text.strip('"')
                i += 6
                continue
            if t.kind != "ident" or prev in ("$", "::", "."):
                i += 1
                continue
            if t.text == "mod" and nxt.kind == "ident":
                name, after = nxt.text, toks[i + 2].text if i + 2 < len(toks) else ""
                child_path = cur.path + (name,)
                if after == "{":                      # inline module
                    child = Module(child_path, file, cur)
                    self.modules.append(child)
                    cur.children[name] = child
                    sub = cdir / (pending_path or name)
                    stack.append((child, depth + 1, sub))
                    pending_path = None
                    i += 2
                    continue
                if pending_path:                      # #[path = "..."]
                    f = (cdir if len(stack) > 1 else file.parent) / pending_path
                    f = f if f.is_file() else None
                else:
                    f = mod_file(cdir, name)
                if f is None:
                    self.warnings.append(f"{file}:{t.line}: file of `mod {name};` not found")
                else:
                    cur.children[name] = self._load(f, child_path, cur,
                                                    owns_dir=bool(pending_path) or f.name == "mod.rs")
                pending_path = None
                i += 3
                continue
            if t.text == "use" and nxt.text != "<":   # (not `impl Trait + use<'a>`)
                uses = []
                j = parse_use_tree(toks, i + 1, [], uses)
                for segs, alias, glob, line in uses:
                    if not segs or segs[0] == "::":
                        continue
                    cur.refs.append((segs, line))
                    if depth == body:                 # module-level: a name binding
                        if glob:
                            cur.globs.append(segs)
                        elif (alias or segs[-1]) != "_":
                            cur.binds[alias or segs[-1]] = segs
                i = max(j, i + 1)
                continue
            if depth == body:                         # module-level item names
                if t.text in ITEM_KW and nxt.kind == "ident" and nxt.text not in NOT_NAMES:
                    cur.items.add(nxt.text)
                elif t.text == "static" and nxt.text == "mut":
                    cur.items.add(toks[i + 2].text)
                elif t.text == "macro_rules" and nxt.text == "!":
                    cur.items.add(toks[i + 2].text)
            in_vis = prev == "in" and i > 1 and toks[i - 2].text == "("   # pub(in path)
            if nxt.text == "::" and t.text != "Self" and not in_vis:    # a path in code
                segs, j = [t.text], i + 1
                while j + 1 < len(toks) and toks[j].text == "::" and toks[j + 1].kind == "ident":
                    segs.append(toks[j + 1].text)
                    j += 2
                cur.refs.append((segs, t.line))
                i = j
                continue
            i += 1
        return mod

    # ------------------------------------------------------------------ resolution
    def lookup(self, mod: Module, name: str, seen: set):
        """What `name` means inside `mod`: ('mod', M), ('item', M) or None (extern/unknown)."""
        if (id(mod), name) in seen:
            return None
        seen.add((id(mod), name))
        if name in mod.children:
            return ("mod", mod.children[name])
        if name in mod.items:   # before imports: same name = other namespace (`routes!`)
            return ("item", mod)
        if name in mod.binds:
            return self.resolve(mod, mod.binds[name], seen) or ("ext", None)
        for g in mod.globs:
            r = self.resolve(mod, g, seen)
            if r and r[0] == "mod":
                found = self.lookup(r[1], name, seen)
                if found:
                    return found
        return None

    def resolve(self, ctx: Module, segs: list[str], seen=None):
        """Resolve a path written in `ctx` to ('mod'|'item', module) or None (extern)."""
        seen = set() if seen is None else seen
        i, cur = 1, ctx
        if segs[0] == "crate":
            cur = self.root
        elif segs[0] == "super":
            i = 0
            while i < len(segs) and segs[i] == "super":
                if cur.parent is None:
                    return None
                cur, i = cur.parent, i + 1
        elif segs[0] != "self":
            r = self.lookup(ctx, segs[0], seen)    # relative: child, import, item
            if r is None or r[0] != "mod":
                return r if r and r[0] == "item" else None
            cur = r[1]
        for name in segs[i:]:
            r = self.lookup(cur, name, seen)
            if r is None:       # unknown name (macro-made?): a glob's source, else `cur`
                for g in cur.globs:
                    gr = self.resolve(cur, g, seen)
                    if gr and gr[0] == "mod":
                        return ("item", gr[1])
                return ("item", cur)
            if r[0] != "mod":
                return r if r[0] == "item" else None
            cur = r[1]
        return ("mod", cur)

    def edges(self) -> dict[Module, dict[Module, list[str]]]:
        out: dict[Module, dict[Module, list[str]]] = {m: {} for m in self.modules}
        for m in self.modules:
            for segs, line in m.refs:
                r = self.resolve(m, segs)
                if r and r[1] is not m:
                    out[m].setdefault(r[1], []).append(f"{m.file}:{line}")
        return out


# ---------------------------------------------------------------------------- graph
def sccs(nodes, succ) -> list[list]:
    """Tarjan's algorithm, iterative."""
    index, low, on, stack, result, n = {}, {}, set(), [], [], 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = n; n += 1; stack.append(start); on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = n; n += 1; stack.append(w); on.add(w)
                    work.append((w, iter(succ[w])))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w is v:
                        break
                result.append(comp)
    return result


def cycles_in(comp, succ) -> list[list]:
    """The shortest cycle through each edge of the component (deduplicated)."""
    members, found = set(comp), {}
    for u in comp:
        for v in succ[u]:
            if v not in members:
                continue
            prev, q = {v: None}, deque([v])
            while q and u not in prev:
                x = q.popleft()
                for y in succ[x]:
                    if y in members and y not in prev:
                        prev[y] = x; q.append(y)
            path, x = [], u
            while x is not None:
                path.append(x); x = prev[x]
            cyc = [u] + path[::-1][:-1]               # u -> v -> ... -> (back to u)
            k = min(range(len(cyc)), key=lambda j: cyc[j].name)
            cyc = cyc[k:] + cyc[:k]
            found[tuple(m.name for m in cyc)] = cyc
    return sorted(found.values(), key=lambda c: (len(c), [m.name for m in c]))


# ---------------------------------------------------------------------------- discovery
def crate_roots(root: Path, only: str | None):
    """(label, root file) of every target (lib, bins, tests, benches, examples) of every
    package under `root`; packages in the workspace's `exclude` are skipped unless they are
    their own workspace (fuzz/)."""
    ws = tomllib.loads((root / "Cargo.toml").read_text()) if (root / "Cargo.toml").is_file() else {}
    excluded = {(root / e).resolve() for e in ws.get("workspace", {}).get("exclude", [])}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if n not in ("target", "node_modules")
                             and not n.startswith("."))
        if "Cargo.toml" not in filenames:
            continue
        toml = tomllib.loads((d / "Cargo.toml").read_text())
        if d.resolve() in excluded and "workspace" not in toml:
            dirnames[:] = []                          # excluded, not its own workspace
            continue
        pkg = toml.get("package")
        if not pkg or (only and not fnmatch.fnmatch(pkg["name"], only)):
            continue
        targets = {}
        def add(kind, f: Path):
            if f.is_file():
                targets.setdefault(f.resolve(), (kind, f))
        lib = toml.get("lib", {}).get("path", "src/lib.rs")
        add("lib", d / lib)
        for kind, auto, dirs in (("bin", "autobins", ["src/bin"]), ("test", "autotests", ["tests"]),
                                 ("bench", "autobenches", ["benches"]),
                                 ("example", "autoexamples", ["examples"])):
            for t in toml.get(kind, []):
                if "path" in t:
                    add(kind, d / t["path"])
            if kind == "bin" and pkg.get("autobins", True):
                add("bin", d / "src/main.rs")
            if pkg.get(auto, True):
                for sub in dirs:
                    for f in sorted((d / sub).glob("*.rs")) + sorted((d / sub).glob("*/main.rs")):
                        add(kind, f)
        for kind, f in targets.values():
            yield f"{pkg['name']} ({kind}) {os.path.relpath(f, root)}", f


# ---------------------------------------------------------------------------- main
def analyse(root: Path, only=None, verbose=False, out=print) -> tuple[int, int, int]:
    n_crates = n_mods = n_cycles = 0
    for label, f in crate_roots(root, only):
        crate = Crate(label, f)
        n_crates += 1
        n_mods += len(crate.modules)
        edges = crate.edges()
        rel = lambda loc: os.path.relpath(loc, root)
        for w in crate.warnings:
            print(f"warning: {w}", file=sys.stderr)
        comps = [c for c in sccs(crate.modules, edges) if len(c) > 1]
        if verbose or comps:
            out(f"== {label}")
        if verbose:
            for m in crate.modules:
                for t, locs in edges[m].items():
                    out(f"   edge {m.name} -> {t.name}  ({rel(locs[0])})")
        for comp in sorted(comps, key=lambda c: sorted(m.name for m in c)):
            n_cycles += 1
            out(f"  cycle: {', '.join(sorted(m.name for m in comp))}")
            for cyc in cycles_in(comp, edges):
                out("    " + " -> ".join(m.name for m in cyc + cyc[:1]))
                for a, b in zip(cyc, cyc[1:] + cyc[:1]):
                    out(f"      {a.name} -> {b.name}: {rel(edges[a][b][0])}")
    out(f"{n_crates} crates, {n_mods} modules, {n_cycles} cycles")
    return n_crates, n_mods, n_cycles


def self_test() -> int:
    def run(files: dict[str, str]):
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "Cargo.toml").write_text('[package]\nname = "t"\nversion = "0.1.0"\n')
            for name, text in files.items():
                (d / "src" / name).parent.mkdir(parents=True, exist_ok=True)
                (d / "src" / name).write_text(text)
            lines = []
            n = analyse(d, out=lines.append)[2]
            crate = Crate("t", d / "src/lib.rs")
            e = {(a.name, b.name) for a, bs in crate.edges().items() for b in bs}
            return n, e, "\n".join(lines)
    # name: (files under src/, expected number of cycles, edges required, edges forbidden)
    cases = {
        "two-file cycle": ({"lib.rs": "mod a; mod b;", "a.rs": "use crate::b::B; pub struct A;",
                            "b.rs": "pub struct B(crate::a::A);"}, 1, [("a", "b"), ("b", "a")], []),
        "parent/child via super::X and a re-export": (
            {"lib.rs": "pub mod p;", "p.rs": "mod c;\npub use c::Thing;\npub struct Config;",
             "p/c.rs": "use super::Config;\npub struct Thing;"}, 1, [("p", "p::c"), ("p::c", "p")], []),
        "facade re-export": ({"lib.rs": "mod a; mod b;\npub use a::X;",
                              "a.rs": "pub struct X;", "b.rs": "fn f() -> crate::X { todo!() }"},
                             0, [("b", "a"), ("crate", "a")], [("b", "crate")]),
        "re-export chain, alias, extern": (
            {"lib.rs": "mod a; mod b; mod c;\npub use b::Y as Z;\npub use std::sync as s;",
             "a.rs": "fn f(_: crate::Z, _: crate::s::Arc<()>) {}",
             "b.rs": "pub use crate::c::{self as cc, Y};", "c.rs": "pub struct Y;"},
            0, [("a", "c"), ("b", "c")], [("a", "b"), ("a", "crate")]),
        "strings and comments": ({"lib.rs": "mod a; mod b;", "a.rs": "use crate::b::B;",
                                  "b.rs": '// use crate::a::A;\n/* /* use crate::a */ */\n'
                                          '/// [`crate::a::A`]\nconst S: &str = "use crate::a::A; {";\n'
                                          'const R: &[u8] = br#"crate::a::A"#;\npub struct B;'},
                                 0, [("a", "b")], [("b", "a")]),
        "inline mod tests": ({"lib.rs": "mod a;", "a.rs": "pub fn f() {}\n#[cfg(test)]\n"
                              "mod tests {\n    use super::*;\n    #[test] fn t() { f(); }\n}"},
                             0, [("a::tests", "a")], []),
        "raw strings with braces": ({"lib.rs": "mod a; mod b;",
                                     "a.rs": 'const J: &str = r##"{ "x": "}"# }"##;\n'
                                             "mod inner { use crate::b::B; }\nuse crate::b::C;",
                                     "b.rs": "pub struct B; pub struct C; use crate::a::inner;"},
                                    1, [("a::inner", "b"), ("a", "b"), ("b", "a::inner")], []),
        "lifetimes and chars": ({"lib.rs": "mod a; mod b;",
                                 "a.rs": "fn f<'a>(x: &'a str) -> char { let _ = '{'; '\\'' }\n"
                                         "struct S<'b> { x: &'b str }\nmod m { use crate::b::B; }",
                                 "b.rs": "pub struct B;"}, 0, [("a::m", "b")], [("a", "b")]),
        "fn and imported macro of one name; #[path]": (
            {"lib.rs": "mod a;\n#[path = \"other/x.rs\"]\nmod b;", "other/x.rs": "use crate::a::routes;",
             "a.rs": "use m::routes;\npub fn routes() {}\nfn g() { crate::b::h() }"},
            1, [("b", "a"), ("a", "b")], []),
    }
    failed = 0
    for name, (files, want, need, forbid) in cases.items():
        n, e, text = run(files)
        ok = n == want and all(x in e for x in need) and not any(x in e for x in forbid)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}"
              + ("" if ok else f": {n} cycles, edges {sorted(e)}\n{text}"))
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--crate", help="only packages whose name matches (glob)")
    ap.add_argument("--verbose", action="store_true", help="print every edge")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    if a.self_test:
        return self_test()
    return 1 if analyse(a.root.resolve(), a.crate, a.verbose)[2] else 0


if __name__ == "__main__":
    sys.exit(main())
