"""The package's imports point down its layers (docs/ARCHITECTURE.md "Layers") and no modules import each other.

Read from the source with `ast`, every import counts — top-level or inside a function — except those under
`if TYPE_CHECKING:` (annotations only, never executed)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dpo_jax"

# Top to bottom. A module may import from a lower floor, or from its own package on its own floor.
FLOORS = (
    ("main",),
    ("commands",),
    ("experiments",),
    ("evaluation", "plan"),
    ("rlhf",),
    ("train",),
    ("data", "convert", "flops", "reference"),
    ("models", "losses", "logprobs"),
    ("config", "parsing", "sharding", "summaries", "metrics", "fingerprint", "distributed", "compile_target",
     "compile_clock", "compile_cache"),
)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The dpo_jax modules `module` imports (a `from X import name` of a submodule counts as that submodule)."""
    found: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dpo_jax"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            if base.startswith("dpo_jax"):
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found - {module}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: _imports(ast.parse(p.read_text()), m, p.name == "__init__.py", set(files)) for m, p in files.items()}


def _unit(module: str) -> str:
    """The top-level package or module under dpo_jax ('' for dpo_jax itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _floor(module: str) -> int:
    unit = _unit(module)
    for i, floor in enumerate(FLOORS):
        if unit in floor:
            return i
    raise AssertionError(f"dpo_jax.{unit} has no floor in tests/test_layers.py FLOORS: place it (and say where in "
                         "docs/ARCHITECTURE.md)")


def _climbs(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imports in sorted(graph.items()):
        for target in sorted(imports - {"dpo_jax"}):
            if module == "dpo_jax":
                continue
            same_unit = _unit(target) == _unit(module)
            if _floor(target) < _floor(module) or (_floor(target) == _floor(module) and not same_unit):
                wrong.append(f"{module} imports {target}")
    return wrong


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target in graph and target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_every_import_points_down_the_layers():
    wrong = _climbs(_graph())
    assert not wrong, "imports that climb (or cross) the layers:\n  " + "\n  ".join(wrong)


def test_no_modules_import_each_other():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_checker_sees_a_climb_a_crossing_and_a_cycle():
    """The two tests above can fail: made-up imports that climb, cross a floor and go round are caught."""
    tree = ast.parse("from dpo_jax.commands import train\nif TYPE_CHECKING:\n    from dpo_jax import main\n"
                     "def f():\n    from dpo_jax.models import decoder\n")
    modules = {"dpo_jax.commands.train", "dpo_jax.models.decoder", "dpo_jax.main"}
    found = _imports(tree, "dpo_jax.models.reward", False, modules)
    assert found == {"dpo_jax.commands.train", "dpo_jax.models.decoder"}  # TYPE_CHECKING skipped, lazy counted
    graph = {"dpo_jax.models.reward": found, "dpo_jax.data.loader": {"dpo_jax.convert.hf"},
             "dpo_jax.train.a": {"dpo_jax.train.b"}, "dpo_jax.train.b": {"dpo_jax.train.a"}}
    assert _climbs(graph) == ["dpo_jax.data.loader imports dpo_jax.convert.hf",
                              "dpo_jax.models.reward imports dpo_jax.commands.train"]
    assert _cycles(graph) == ["dpo_jax.train.a -> dpo_jax.train.b -> dpo_jax.train.a"]


def test_the_readme_module_map_matches_the_tree():
    """Every module of the package is in README.md's module map, under its package, and the map names no other."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme.split("## Module map", 1)[1].split("```", 2)[1]
    listed, package = set(), ""
    for line in block.splitlines():
        top = re.match(r"^  (\w+)/\s", line)
        if top:
            package = top.group(1)
        elif re.match(r"^  \w+\.py", line):
            package = ""
        elif not line.startswith("    "):
            continue
        listed |= {(package, name) for name in re.findall(r"\b(\w+\.py)\b", line)}
    tree = {(p.parent.name if p.parent != PACKAGE else "", p.name) for p in PACKAGE.rglob("*.py")
            if p.name != "__init__.py"}
    assert listed - tree == set(), "the map names modules that do not exist"
    assert tree - listed == set(), "modules missing from the map"
