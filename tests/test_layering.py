"""Layering: no import cycle among the modules of deepseek_v4 and kernels_pallas, counting the
imports hidden inside functions.

Every module's AST is walked for every `import` / `from ... import` node, wherever it sits (module
level, inside a function, under `if TYPE_CHECKING`), and each becomes an edge of a graph whose
nodes are the project's modules (a package is its `__init__.py`):

* `import a.b.c` and `from a.b import c` where `a.b.c` is a module: an edge to `a.b.c`;
  `from a.b import name` where `name` is not a module: an edge to the package `a.b` (its
  `__init__` defines or re-exports `name`); relative imports are resolved first.
* Importing `a.b.c` also runs the `__init__` of `a` and `a.b`, so the importer gets an edge to
  each of those packages too, except the packages that contain the importer itself: they are
  already being initialized when it runs (that is how `deepseek_v4.layers.moe_ffn` importing
  `deepseek_v4.checkpoint.quant` was a cycle through `checkpoint/__init__` and the model, while
  `deepseek_v4.config` importing nothing from its own package is not one).
* A package importing its own submodules (`deepseek_v4/__init__.py` re-exporting `config`) is an
  ordinary edge; it is a cycle only if the submodule imports the package back, which the previous
  rule counts only for a name the package itself provides.

Strongly connected components (Tarjan) of more than one module are cycles; the test prints each
with the edges that form it.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("deepseek_v4", "kernels_pallas")

# Edges left out of the graph. Each names why it exists and who owns removing it; an entry must be
# a function-level import (checked below), never one that runs when the module loads.
ALLOWED_EDGES = {
  # ModelConfig.from_hf / to_hf are the public entry points of the config.json reader/writer
  # (README: `dsv4.ModelConfig.from_hf(...)`); they delegate to config_hf, which imports config.
  # The reader stays out of config.py and loading the dataclass never loads it. Owner: config.
  ("deepseek_v4.config", "deepseek_v4.config_hf"):
    "ModelConfig.from_hf/to_hf delegate to the config.json boundary module",
}


def project_modules(root: str = ROOT) -> dict[str, str]:
  """Dotted module name -> file path, for every .py file of the project packages."""
  mods = {}
  for pkg in PACKAGES:
    for folder, dirs, files in os.walk(os.path.join(root, pkg)):
      dirs[:] = sorted(d for d in dirs if d != "__pycache__")
      for f in sorted(files):
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(folder, f), root)[:-3].replace(os.sep, ".")
          mods[rel.removesuffix(".__init__")] = os.path.join(folder, f)
  return mods


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
  """The dotted names an import node reaches (`pkg.name` for every `from pkg import name`)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if node.level:
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
      base = base.rpartition(".")[0]
    source = f"{base}.{node.module}" if node.module else base
  else:
    source = node.module
  return [source] + [f"{source}.{a.name}" for a in node.names]


def _targets(node: ast.AST, module: str, mods: dict[str, str]) -> list[str]:
  """The project modules an import node makes `module` depend on (see the module doc)."""
  names = _imported(node, module, mods[module].endswith("__init__.py"))
  if isinstance(node, ast.ImportFrom):
    # `from src import a, b`: each `src.a` that is a module, else `src` itself.
    source, members = names[0], names[1:]
    names = [m if m in mods else source for m in members]
  out = []
  for target in names:
    while target and target not in mods:  # `import pkg.not_a_module` -> pkg
      target = target.rpartition(".")[0]
    if not target or target == module:
      continue
    out.append(target)
    parent = target.rpartition(".")[0]
    while parent and not (module == parent or module.startswith(parent + ".")):
      out.append(parent)  # a package whose __init__ this import runs
      parent = parent.rpartition(".")[0]
  return [t for t in out if t in mods and t != module]


def _parse(path: str) -> ast.Module:
  with open(path, encoding="utf-8") as f:
    return ast.parse(f.read(), filename=path)


def import_graph(mods: dict[str, str]) -> dict[str, dict[str, int]]:
  """module -> {imported project module: line of the first import}; see the module doc."""
  graph: dict[str, dict[str, int]] = {m: {} for m in mods}
  for module, path in mods.items():
    for node in ast.walk(_parse(path)):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        for target in _targets(node, module, mods):
          graph[module].setdefault(target, node.lineno)
  return graph


def function_level(mods: dict[str, str], module: str, target: str) -> bool:
  """Whether every import that makes `module` depend on `target` sits inside a function body."""
  tree = _parse(mods[module])
  in_functions = {id(n) for fn in ast.walk(tree)
                  if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                  for n in ast.walk(fn)}
  return not any(isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in in_functions
                 and target in _targets(node, module, mods) for node in ast.walk(tree))


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan, iterative)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  out: list[list[str]] = []
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      v, it = work[-1]
      for w in it:
        if w not in index:
          index[w] = low[w] = len(index)
          stack.append(w)
          on_stack.add(w)
          work.append((w, iter(sorted(graph[w]))))
          break
        if w in on_stack:
          low[v] = min(low[v], index[w])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[v])
        if low[v] == index[v]:
          comp = []
          while True:
            w = stack.pop()
            on_stack.discard(w)
            comp.append(w)
            if w == v:
              break
          if len(comp) > 1:
            out.append(sorted(comp))
  return out


def _describe(graph, comp) -> str:
  edges = [f"    {a} -> {b} (line {graph[a][b]})" for a in comp for b in sorted(graph[a]) if b in comp]
  return "  cycle: " + ", ".join(comp) + "\n" + "\n".join(edges)


def test_no_import_cycles():
  mods = project_modules()
  graph = import_graph(mods)
  for a, b in ALLOWED_EDGES:
    graph.get(a, {}).pop(b, None)
  found = cycles(graph)
  assert not found, "import cycles among the project's modules:\n" + "\n".join(
    _describe(graph, c) for c in found)


def test_kernels_never_import_the_model():
  """Dependencies go one way, deepseek_v4 -> kernels_pallas (STYLE.md §1): the kernels stay
  reusable without the model package."""
  graph = import_graph(project_modules())
  back = sorted(f"{a} -> {b} (line {graph[a][b]})" for a in graph if a.startswith("kernels_pallas")
                for b in graph[a] if b.startswith("deepseek_v4"))
  assert not back, "kernels_pallas imports deepseek_v4:\n  " + "\n  ".join(back)


@pytest.mark.parametrize("edge", sorted(ALLOWED_EDGES))
def test_allowed_edges_are_function_level(edge):
  mods = project_modules()
  a, b = edge
  if a not in mods or b not in import_graph(mods)[a]:
    return  # the edge is gone: its entry can be dropped, nothing to check
  assert function_level(mods, a, b), f"{a} imports {b} at module level: {ALLOWED_EDGES[edge]}"


def argparse_importers(mods: dict[str, str]) -> list[str]:
  """`module (line N)` for every import of argparse, at module level or inside a function, in a
  module that is neither deepseek_v4/cli.py nor a `*_cli.py` command module."""
  out = []
  for module, path in sorted(mods.items()):
    if module == "deepseek_v4.cli" or module.endswith("_cli"):
      continue
    for node in ast.walk(_parse(path)):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
      if any(n == "argparse" or n.startswith("argparse.") for n in names):
        out.append(f"{module} (line {node.lineno})")
  return out


def test_only_command_modules_parse_flags():
  """The library reads no flags (STYLE.md §2, §10): argparse lives in cli.py and the `*_cli.py`
  module of each subcommand, which call library functions."""
  found = argparse_importers(project_modules())
  assert not found, ("argparse imported outside cli.py / *_cli.py (move the flags into the "
                     "subcommand's *_cli.py):\n  " + "\n  ".join(found))


def _write(root, files: dict[str, str]) -> None:
  for rel, text in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)


def _cycles_of(root) -> list[list[str]]:
  return cycles(import_graph(project_modules(str(root))))


def test_detects_a_cycle_hidden_in_a_function(tmp_path):
  _write(tmp_path, {
    "deepseek_v4/__init__.py": "",
    "deepseek_v4/a.py": "from deepseek_v4 import b\n",
    "deepseek_v4/b.py": "def f():\n  from deepseek_v4 import a\n  return a\n",
  })
  assert _cycles_of(tmp_path) == [["deepseek_v4.a", "deepseek_v4.b"]]


def test_detects_a_cycle_through_a_package_init(tmp_path):
  # layers/x imports ckpt.codec: that runs ckpt/__init__, which imports the layer back.
  _write(tmp_path, {
    "deepseek_v4/__init__.py": "",
    "deepseek_v4/layers/__init__.py": "",
    "deepseek_v4/layers/x.py": "def f():\n  from deepseek_v4.ckpt import codec\n",
    "deepseek_v4/ckpt/__init__.py": "from deepseek_v4.ckpt.load import load\n",
    "deepseek_v4/ckpt/load.py": "from deepseek_v4.layers import x\nload = 1\n",
    "deepseek_v4/ckpt/codec.py": "",
  })
  assert _cycles_of(tmp_path) == [["deepseek_v4.ckpt", "deepseek_v4.ckpt.load",
                                   "deepseek_v4.layers.x"]]


def test_a_package_importing_its_submodules_is_not_a_cycle(tmp_path):
  # __init__ re-exports sub.f; sub imports a sibling through the package path: no cycle. Taking a
  # name the package __init__ provides (`from deepseek_v4 import g`) closes one.
  files = {
    "deepseek_v4/__init__.py": "from deepseek_v4.sub import f\nfrom deepseek_v4.other import g\n",
    "deepseek_v4/sub.py": "from deepseek_v4 import other\nimport deepseek_v4.other\nf = 1\n",
    "deepseek_v4/other.py": "g = 2\n",
  }
  _write(tmp_path, files)
  assert _cycles_of(tmp_path) == []
  _write(tmp_path, {"deepseek_v4/other.py": "from deepseek_v4 import f\ng = 2\n"})
  assert _cycles_of(tmp_path) == [["deepseek_v4", "deepseek_v4.other", "deepseek_v4.sub"]]


def test_relative_imports_resolve(tmp_path):
  _write(tmp_path, {
    "kernels_pallas/__init__.py": "",
    "kernels_pallas/op/__init__.py": "",
    "kernels_pallas/op/ops.py": "from . import kernel\n",
    "kernels_pallas/op/kernel.py": "from .ops import thing\n",
  })
  assert _cycles_of(tmp_path) == [["kernels_pallas.op.kernel", "kernels_pallas.op.ops"]]


def test_function_level_tells_the_two_kinds_apart(tmp_path):
  _write(tmp_path, {
    "deepseek_v4/__init__.py": "",
    "deepseek_v4/a.py": "import json\nfrom deepseek_v4 import c\n\n"
                        "def f():\n  from deepseek_v4 import b\n  return b\n",
    "deepseek_v4/b.py": "",
    "deepseek_v4/c.py": "",
  })
  mods = project_modules(str(tmp_path))
  assert function_level(mods, "deepseek_v4.a", "deepseek_v4.b")
  assert not function_level(mods, "deepseek_v4.a", "deepseek_v4.c")


def test_argparse_importers_sees_every_form(tmp_path):
  _write(tmp_path, {
    "deepseek_v4/__init__.py": "",
    "deepseek_v4/cli.py": "import argparse\n",
    "deepseek_v4/plan_cli.py": "import argparse\n",
    "deepseek_v4/plan.py": "import json\n\ndef f():\n  import argparse\n  return argparse\n",
    "deepseek_v4/summary.py": "from argparse import Namespace\n",
    "deepseek_v4/layers/__init__.py": "",
    "deepseek_v4/layers/x.py": "import os, argparse as ap\n",
    "deepseek_v4/layers/y.py": "from . import argparse\n",  # a sibling module, not the stdlib
  })
  assert argparse_importers(project_modules(str(tmp_path))) == [
    "deepseek_v4.layers.x (line 1)", "deepseek_v4.plan (line 4)", "deepseek_v4.summary (line 1)"]
