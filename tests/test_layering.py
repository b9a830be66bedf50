"""Import layering (issue 15): runtime modules never import the CLI or the converter, and no lingjax
modules import each other in a cycle. Checked two ways: a fresh interpreter imports each runtime
module and lists the lingjax modules that came with it (what really gets loaded), and a static walk
of every module's imports, at the top and inside functions (what could get loaded)."""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "lingjax"
# The tools on top: the CLI package (lingjax.cli and every module under it), the converter, the eval and
# the benchmark. A runtime module reaching any of them fails.
TOOLS = ("lingjax.convert", "lingjax.evaluate", "lingjax.bench")
RUNTIME_PREFIXES = ("lingjax.model", "lingjax.kernels", "lingjax.engine", "lingjax.cache", "lingjax.batch",
                    "lingjax.checkpoint", "lingjax.server", "lingjax.tokenizer", "lingjax.sharding",
                    "lingjax.weights", "lingjax.config", "lingjax.speculative")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}
RUNTIME = sorted(m for m in MODULES if m.startswith(RUNTIME_PREFIXES))


def is_cli(m: str) -> bool:
    return m == "lingjax.cli" or m.startswith("lingjax.cli.")


def forbidden(mods) -> list[str]:
    """The tool modules among mods."""
    return sorted(m for m in mods if is_cli(m) or m in TOOLS)


def imports_of(name: str) -> set[str]:
    """lingjax modules that `name` imports anywhere in its source (top level or inside functions)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}       # `from lingjax import cli`
    return {m for m in out if m in MODULES and m != name}


def test_the_checks_see_the_modules():
    assert {"lingjax.engine", "lingjax.engine_loop", "lingjax.checkpoint", "lingjax.model.decoder",
            "lingjax.kernels.linear_attention"} <= set(RUNTIME)
    assert {"lingjax.cli.convert", "lingjax.cli.common"} <= imports_of("lingjax.cli") | imports_of("lingjax.cli.score")
    assert "lingjax.convert" in imports_of("lingjax.cli.convert") and "lingjax.checkpoint" in imports_of("lingjax.engine")
    assert forbidden(["lingjax.cli", "lingjax.cli.common", "lingjax.cli.serve", "lingjax.convert", "lingjax.client",
                      "lingjax.engine"]) == ["lingjax.cli", "lingjax.cli.common", "lingjax.cli.serve", "lingjax.convert"]


@pytest.mark.parametrize("name", RUNTIME)
def test_runtime_module_never_imports_cli_or_converter_statically(name):
    seen, todo = set(), [name]
    while todo:                                   # everything reachable through lingjax imports
        m = todo.pop()
        for dep in imports_of(m) - seen:
            seen.add(dep)
            todo.append(dep)
    assert not forbidden(seen), f"{name} reaches {forbidden(seen)}"


@pytest.mark.parametrize("name", TOOLS)
def test_tools_below_the_cli_never_import_it(name):
    """The converter, the eval and the benchmark are libraries the CLI calls: they never import lingjax.cli."""
    assert not [m for m in imports_of(name) if is_cli(m)]


def test_runtime_modules_loaded_in_a_fresh_interpreter():
    code = ("import importlib, json, sys\n"
            "out = {}\n"
            f"for name in {RUNTIME!r}:\n"
            "    before = set(sys.modules)\n"
            "    importlib.import_module(name)\n"
            "    out[name] = sorted(m for m in sys.modules if m.startswith('lingjax'))\n"
            "print(json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    everything = set(loaded[RUNTIME[-1]])
    assert "lingjax.engine" in everything and "lingjax.model.decoder" in everything
    assert not forbidden(everything), forbidden(everything)


def test_no_import_cycles():
    graph = {m: imports_of(m) for m in MODULES}
    # a package __init__ importing its own submodules is not a cycle of the layering
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, " ; ".join(" -> ".join(c) for c in cycle)
