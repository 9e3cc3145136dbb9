"""The package's shape (docs/ARCHITECTURE.md): no import cycle, few top-level modules, a face
with ``__all__`` that serves without loading training, no long function, bench outside the wheel.

The layer order itself is import-linter's contract in pyproject.toml (``make lint``); the import
graph here is grimp's, which import-linter builds on, and counts imports inside functions too.
"""
import ast
import importlib
import os
import subprocess
import sys

import pytest

import elsa_codec

PKG = os.path.dirname(elsa_codec.__file__)
MAX_TOP_MODULES = 8
MAX_FUNCTION_LINES = 80


def _graph():
    grimp = pytest.importorskip("grimp")
    return grimp.build_graph("elsa_codec", cache_dir=None)


def _cycles(edges: dict) -> list:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    g = _graph()
    edges = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    assert _cycles(edges) == []


def test_few_modules_at_the_top():
    top = sorted(f for f in os.listdir(PKG) if f.endswith(".py"))
    assert len(top) <= MAX_TOP_MODULES, top


def test_no_bench_in_the_package():
    assert importlib.util.find_spec("elsa_codec.bench") is None


def test_face_all_resolves():
    assert len(set(elsa_codec.__all__)) == len(elsa_codec.__all__)
    for name in elsa_codec.__all__:
        assert getattr(elsa_codec, name) is not None, name


def test_removed_names_name_their_replacement():
    with pytest.raises(AttributeError, match="ELSATransformersConv1D"):
        elsa_codec.ELSAConv1D  # noqa: B018


def test_serving_import_loads_no_training():
    code = ("import sys, elsa_codec\n"
            "print(' '.join(m for m in sys.modules if m.startswith('elsa_codec')))\n"
            "print(' '.join(m for m in ('triton', 'transformers', 'lightning') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    loaded, external = out[0].split(), out[1].split()
    heavy = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in ("training", "examples", "cli")]
    assert heavy == [], heavy
    assert external == [], external


def _functions(path: str):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node.name, node.lineno, node.end_lineno - start + 1


def test_no_long_functions():
    long = []
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(root, f)
                long += [f"{os.path.relpath(p, PKG)}:{line} {name} ({n} lines)"
                         for name, line, n in _functions(p) if n > MAX_FUNCTION_LINES]
    assert long == []
