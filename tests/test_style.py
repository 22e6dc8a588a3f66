"""The project's rules that a reader relies on: the pieces people copy (losses.py, models.py, data.py) do not
import DeepSpeed, no line of the code a learner reads is over 110 characters, and no function over 50 lines."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READ = [*glob.glob(os.path.join(ROOT, "minrlhf", "*.py")),
        *(os.path.join(ROOT, name) for name in ("train.py", "eval.py", "plot.py", "merge.py"))]


def imported_modules(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


def test_the_copied_modules_do_not_import_deepspeed():
    for name in ("losses", "models", "data"):
        modules = set(imported_modules(os.path.join(ROOT, "minrlhf", f"{name}.py")))
        assert not any(m.split(".")[0] == "deepspeed" for m in modules), name
        local = {m.lstrip(".") for m in modules if m.startswith(".")}  # what they import from the package
        assert local <= {"losses", "models", "data"}, (name, local)  # none of the plumbing, which does


def test_no_line_over_110_characters():
    long = [f"{os.path.relpath(path, ROOT)}:{number}" for path in READ
            for number, line in enumerate(open(path, encoding="utf-8"), 1) if len(line.rstrip("\n")) > 110]
    assert not long


def test_no_function_over_50_lines():
    long = []
    for path in READ:
        with open(path) as f:
            tree = ast.parse(f.read())
        long += [f"{os.path.relpath(path, ROOT)}:{node.name}" for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 50]
    assert not long
