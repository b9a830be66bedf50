"""Every third-party module the package imports is a declared runtime dependency (issue 20, defect 3).

Building a clean venv of only the declared dependencies is slow; instead every module of lingjax is
parsed with `ast`, every import it makes (top-level and inside functions) of a module outside the
standard library is mapped to its distribution with importlib.metadata.packages_distributions(),
and that distribution must be listed under [project] dependencies in pyproject.toml."""
import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Imports a runtime module may make of a test-only dependency, each for a test-only code path, with
# the module that makes it: nothing else may import them.
TEST_ONLY = {"torch": {"lingjax/kernels/linear_attention/triton_gpu.py"}}   # impl='gpu_interpret': Triton's
#                                                   CPU interpreter runs on torch CPU tensors (tests only)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_runtime_dependencies() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {_norm(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in meta["project"]["dependencies"]}


def third_party_imports(package_dir: pathlib.Path) -> dict[str, set[str]]:
    """top-level module name -> the files that import it (absolute imports outside stdlib and the package)."""
    found: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top in sys.stdlib_module_names or top in ("lingjax", "__future__"):
                    continue
                found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_a_declared_dependency():
    declared = declared_runtime_dependencies()
    dists = importlib.metadata.packages_distributions()
    imports = third_party_imports(ROOT / "lingjax")
    assert {"jax", "numpy", "flax", "jinja2"} <= set(imports)      # the walk sees function-level imports too
    missing = []
    for mod, files in sorted(imports.items()):
        if mod in TEST_ONLY and files <= TEST_ONLY[mod]:
            continue
        providers = {_norm(d) for d in dists.get(mod, [])}
        if not providers:
            missing.append(f"{mod} (not installed; imported by {sorted(files)})")
        elif not providers & declared:
            missing.append(f"{mod} -> {sorted(providers)} (imported by {sorted(files)})")
    assert not missing, f"imports without a declared runtime dependency in pyproject.toml: {missing}"
