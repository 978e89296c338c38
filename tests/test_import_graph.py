"""The project's modules import each other without a cycle (imports inside functions included), and
reading a config imports neither jax nor optax."""
import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
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
    assert {"clover_jax.run", "clover_jax.train", "clover_jax.eval"} <= set(graph)
    assert "clover_jax.eval" not in graph["clover_jax.train"] and "clover_jax.train" not in graph["clover_jax.eval"]
    assert find_cycle(graph) == []


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
