"""The import graph of pipeline/, read from the source with ast: no cycles; stages on top, then the libraries
(lm above export, measure, model, text), core at the bottom; no stage imports another; an import inside a function says why."""
import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pipeline"
# What each package's modules may import besides their own package: the layers of the architecture, top down.
# pipeline/__init__.py (INPUT_NAMES, the TensorFlow environment) imports nothing and may be imported by all but
# core; pipeline/__main__.py, the CLI, may import anything.
MAY_IMPORT = {
    "stages": {"lm", "export", "measure", "model", "text", "core"},  # and no other stage
    "lm": {"export", "measure", "model", "text", "core"},  # the language model's library
    "export": {"measure", "model", "text", "core"},
    "measure": {"model", "text", "core"},
    "model": {"text", "core"},
    "text": {"core"},
    "core": set(),
}


def modules(root):
    """{dotted module name: path} of every .py file of the package at `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name, path, known):
    """[(imported module, line, inside a function)] of the package's own modules that module `name` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parents = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import pipeline.model.build` counts as pipeline.model.build
                target = target.rpartition(".")[0]
            if target and target != name:
                out.append((target, node.lineno, id(node) in in_function))
    return out


def graph(root):
    """{module: {modules it imports}} of the package at `root`, imports inside functions included."""
    known = modules(root)
    return {name: {t for t, _, _ in imports(name, path, known)} for name, path in known.items()}


def cycles(edges):
    """The strongly connected components with more than one module (Tarjan): each is an import cycle."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer(module):
    """The package a module belongs to ("stages", "core", ...); "" for the package root and the CLI."""
    parts = module.split(".")
    return "" if len(parts) == 1 or parts[1] == "__main__" else parts[1]


def violations(edges):
    """Imports against the layering: a library importing a stage, a stage importing another, core importing
    anything outside core, a package importing one above it, a module in no known package."""
    out = []
    for source, targets in sorted(edges.items()):
        here = layer(source)
        if here and here not in MAY_IMPORT:
            out.append(f"{source}: in no known package ({', '.join(MAY_IMPORT)}); add its package to MAY_IMPORT")
            continue
        for target in sorted(targets):
            there = layer(target)
            if not here or there == here != "stages":
                continue  # the CLI and the package root; a module of the same library package
            if there == "stages":
                what = "another stage" if here == "stages" else "a stage"
                out.append(f"{source} imports {target}: {what} (stages import libraries only)")
            elif here == "core":
                out.append(f"{source} imports {target}: core imports nothing outside core")
            elif there and there not in MAY_IMPORT[here]:
                out.append(f"{source} imports {target}: {here} may import only {', '.join(sorted(MAY_IMPORT[here]))}")
    return out


def unexplained_imports(root):
    """Imports inside functions with no comment on their line or on the lines of comments and imports above."""
    known, out = modules(root), []
    for name, path in known.items():
        lines = path.read_text(encoding="utf-8").split("\n")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)) and not _commented(lines, sub.lineno - 1):
                    out.append(f"{path.relative_to(root.parent)}:{sub.lineno}: {lines[sub.lineno - 1].strip()}")
    return sorted(set(out))


def _commented(lines, i):
    """A comment on line i, or above it before the first line that is not a comment, an import or blank."""
    while i >= 0:
        line = lines[i].strip()
        if "#" in line:
            return True
        if line and not line.startswith(("import ", "from ")):
            return False
        i -= 1
    return False


# ---------------------------------------------------------------- the real tree


@functools.lru_cache(maxsize=None)
def real_graph():
    return graph(ROOT)


def test_no_import_cycles():
    assert cycles(real_graph()) == []


def test_no_library_imports_a_stage_and_no_stage_another():
    """Only the CLI (pipeline/__main__.py) runs stages."""
    assert [f"{s} imports {t}" for s, ts in real_graph().items() for t in ts
            if layer(t) == "stages" and layer(s) != ""] == []


def test_core_imports_only_core():
    assert [f"{s} imports {t}" for s, ts in real_graph().items() if layer(s) == "core"
            for t in ts if layer(t) != "core"] == []


def test_every_import_points_down_the_layers():
    assert violations(real_graph()) == []


def test_an_import_inside_a_function_says_why():
    """Only to keep TensorFlow or another heavy library off a fast path, with a comment saying so."""
    assert unexplained_imports(ROOT) == []


def test_every_stage_of_the_cli_has_its_module():
    stages = {m.rpartition(".")[2] for m in modules(ROOT) if layer(m) == "stages" and m.count(".") == 2}
    assert stages == {"data", "pretrain", "train", "distill", "compress", "benchmark", "report", "explain", "evaluate",
                      "generate", "search"}


# ---------------------------------------------------------------- the checks themselves


def test_the_checks_find_a_cycle_an_upward_import_and_an_unexplained_one(tmp_path):
    """The same checks on a small package with every fault: they must fail where the real tree would."""
    root = tmp_path / "pipeline"
    sources = {
        "__init__.py": "",
        "core/__init__.py": "", "core/files.py": "from pipeline.text import read\n",
        "text/__init__.py": "", "text/read.py": "from pipeline.core import files\nfrom pipeline.stages.data import x\n",
        "model/__init__.py": "", "model/a.py": "from . import b\n", "model/b.py": "import pipeline.model.a\n",
        "stages/__init__.py": "", "stages/data.py": "def f():\n    from pipeline.stages import train\n",
        "stages/train.py": "def g():\n    import numpy  # heavy: not on the fast path\n",
        "odd/__init__.py": "",
        "lm/__init__.py": "", "lm/train.py": "from pipeline.stages import train\n",
    }
    for name, text in sources.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    edges = graph(root)
    assert cycles(edges) == [["pipeline.core.files", "pipeline.text.read"], ["pipeline.model.a", "pipeline.model.b"]]
    found = violations(edges)
    assert "pipeline.core.files imports pipeline.text.read: core imports nothing outside core" in found
    assert "pipeline.text.read imports pipeline.stages.data: a stage (stages import libraries only)" in found
    assert "pipeline.stages.data imports pipeline.stages.train: another stage (stages import libraries only)" in found
    assert "pipeline.lm.train imports pipeline.stages.train: a stage (stages import libraries only)" in found
    assert any(v.startswith("pipeline.odd: in no known package") for v in found)
    assert unexplained_imports(root) == ["pipeline/stages/data.py:2: from pipeline.stages import train"]
