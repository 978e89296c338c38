"""The project's modules import each other without a cycle (imports inside functions included),
`data_pipelines/` imports nothing from `clover_jax/`, reading a config imports neither jax nor optax, and
README's Layout table names every module."""
import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("clover_jax", "data_pipelines", "configs")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: project modules it imports anywhere in its file}."""
    files = {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_import_cycle_among_the_project_modules():
    graph = import_graph()
    assert {"clover_jax.run_setup", "clover_jax.train", "clover_jax.eval"} <= set(graph)
    assert "clover_jax.eval" not in graph["clover_jax.train"] and "clover_jax.train" not in graph["clover_jax.eval"]
    assert find_cycle(graph) == []


def test_data_pipelines_import_nothing_from_clover_jax():
    graph = import_graph()
    assert {"data_pipelines.build.builder", "data_pipelines.input.input_pipeline"} <= set(graph)
    upward = {module: sorted(t for t in targets if t.startswith("clover_jax"))
              for module, targets in graph.items() if module.startswith("data_pipelines")}
    assert {module: targets for module, targets in upward.items() if targets} == {}


def layout_rows(readme: str) -> dict[str, str]:
    """{path in the first column: the row's role text} of README's Layout table."""
    section = readme.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    return {line.split("`")[1]: line.split("|")[2] for line in section.splitlines() if line.startswith("| `")}


def unlisted_modules(rows: dict[str, str], modules: set[str]) -> list[str]:
    """Modules with neither a row of their own nor a mention (`name.py`) in their folder's row."""
    paths = {m: pathlib.PurePosixPath(m) for m in modules}
    return sorted(m for m, path in paths.items() if m not in rows and
                  f"`{path.name}`" not in rows.get(f"{path.parent}/", ""))


def test_readme_layout_names_every_module_and_only_existing_paths():
    rows = layout_rows((REPO / "README.md").read_text())
    modules = {str(p.relative_to(REPO)) for package in ("clover_jax", "data_pipelines")
               for p in (REPO / package).rglob("*.py") if p.name != "__init__.py"}
    folders = {str(p.parent.relative_to(REPO)) + "/" for package in ("clover_jax", "data_pipelines")
               for p in (REPO / package).rglob("__init__.py")}
    assert unlisted_modules(rows, modules) == [], "modules missing from README's Layout table"
    assert sorted(folders - set(rows)) == [], "packages missing from README's Layout table"
    assert sorted(r for r in rows if not (REPO / r).exists()) == [], "README's Layout names paths that do not exist"


def test_layout_rows_and_unlisted_modules():
    readme = ("# x\n## Layout\n| path | role |\n|---|---|\n| `a/b.py` | B |\n| `a/c/` | C: `d.py` (D) |\n"
              "## Next\n| `e.py` | no |\n")
    rows = layout_rows(readme)
    assert rows == {"a/b.py": " B ", "a/c/": " C: `d.py` (D) "}
    assert unlisted_modules(rows, {"a/b.py", "a/c/d.py", "a/c/f.py", "e.py"}) == ["a/c/f.py", "e.py"]


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_reading_a_config_imports_no_jax_or_optax():
    code = ("import sys\n"
            "import configs.pretrain, configs.finetune_qa, configs.finetune_retrieval, configs.qa_synthetic\n"
            "[m.get_config(a) for m, a in ((configs.pretrain, 'base'), (configs.finetune_qa, 'msrvtt_qa'),"
            " (configs.finetune_retrieval, 'msrvtt'), (configs.qa_synthetic, 'mc'))]\n"
            "print(sorted(m for m in ('jax', 'optax', 'tensorflow', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
