"""The house: the project's modules (the methods/ package's too) import each other without a cycle (imports inside
functions included), shared modules never import a script, and each module imports on its own in a fresh
interpreter, doing no work."""
import ast
import os
import subprocess
import sys

from conftest import REPO

MODULES = sorted([f[:-3] for f in os.listdir(REPO) if f.endswith(".py")]
                 + ["methods" if f == "__init__.py" else f"methods.{f[:-3]}"
                    for f in os.listdir(os.path.join(REPO, "methods")) if f.endswith(".py")])


def module_path(module):
    if module == "methods":
        return os.path.join(REPO, "methods", "__init__.py")
    return os.path.join(REPO, *module.split(".")) + ".py"
# the scripts a user runs; everything else is a shared module, which must not import them (STYLE.md)
SCRIPTS = {m for m in MODULES if m.startswith(("train_", "time_", "evaluate", "demo", "bench_", "compare"))}


def project_imports(module):
    """The project modules `module` imports anywhere in its file (top level or inside a function); `from methods
    import cwd` imports methods.cwd (and the package)."""
    tree = ast.parse(open(module_path(module)).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    found |= {name.split(".")[0] for name in found}
    return found & set(MODULES) - {module}


def test_import_graph_is_acyclic_and_points_from_scripts_to_shared_modules():
    graph = {m: project_imports(m) for m in MODULES}
    done, visiting = set(), []

    def visit(m):  # depth-first; a module met again on the current path closes a cycle
        if m in visiting:
            raise AssertionError("import cycle: " + " -> ".join(visiting[visiting.index(m):] + [m]))
        if m not in done:
            visiting.append(m)
            for n in sorted(graph[m]):
                visit(n)
            visiting.pop()
            done.add(m)
    for m in MODULES:
        visit(m)
    upward = {m: sorted(graph[m] & SCRIPTS) for m in MODULES if m not in SCRIPTS and graph[m] & SCRIPTS}
    assert not upward, f"shared modules importing scripts: {upward}"
    assert {"common", "voc", "fileio", "engine", "distill", "methods", "methods.cwd"} <= set(MODULES) - SCRIPTS


def test_each_module_imports_alone_and_does_no_work(tmp_path):
    """Each module imported by itself (the project's modules forgotten in between), in a fresh interpreter started in
    an empty folder: nothing raises and nothing is written."""
    code = ("import importlib, sys\n"
            f"sys.path.insert(0, {REPO!r})\n"
            f"for m in {MODULES!r}:\n"
            f"    for name in {MODULES!r}:\n"
            "        sys.modules.pop(name, None)\n"
            "    importlib.import_module(m)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "" and os.listdir(tmp_path) == []


def test_only_entry_points_end_the_process():
    """No module raises SystemExit or calls sys.exit/exit except errors.main_entry (STYLE.md): a script's main() can be
    called by another script (compare.py runs many) and a failure there raises errors.UserError, reported per run."""
    enders = []
    for m in MODULES + [f"tools/{f[:-3]}" for f in os.listdir(os.path.join(REPO, "tools")) if f.endswith(".py")]:
        tree = ast.parse(open(module_path(m) if not m.startswith("tools/") else os.path.join(REPO, m + ".py")).read())
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                name = "SystemExit"
            elif isinstance(node, ast.Call) and ast.unparse(node.func) != "SystemExit":
                name = ast.unparse(node.func)
            if name in ("SystemExit", "sys.exit", "exit", "os._exit") and (m, name) not in ALLOWED_ENDERS:
                enders.append(f"{m}.py:{node.lineno} {name}")
    assert not enders, enders


# errors.main_entry turns the project's exceptions into an exit status; a second signal during training exits at once;
# a torchrun process ends without Python's teardown (distributed.end_process, called by main_entry)
ALLOWED_ENDERS = {("errors", "sys.exit"), ("engine", "os._exit"), ("distributed", "os._exit")}


def test_every_scripts_help_prints():
    """`python <script>.py --help` of every script (a literal % in a help text broke every training script's)."""
    import importlib
    for name in sorted(SCRIPTS):
        module = importlib.import_module(name)
        if hasattr(module, "get_args_parser"):
            assert "--help" in module.get_args_parser().format_help(), name
