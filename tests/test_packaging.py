"""What a fresh install needs: every import resolves from the declared dependencies, the README's
set-up commands are what CI runs, and the light entry points do not pull in torch."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from batch_files import plan_without_torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "batchllm"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return {_normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r).group()) for r in reqs}


def _third_party_imports(files: list[Path], local: set[str]) -> dict[str, Path]:
    """Top-level module names imported anywhere in `files` (module level or inside functions)."""
    found: dict[str, Path] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, f)
    return found


def _undeclared(imports: dict[str, Path], declared: set[str], by_name: bool = False) -> list[str]:
    """Imports no declared distribution provides. `by_name`: a module no installed distribution
    provides (an optional extra not installed here) counts as provided by the one it is named as."""
    dists = importlib.metadata.packages_distributions()
    bad = []
    for module, where in sorted(imports.items()):
        owners = {_normalize(d) for d in dists.get(module, [])}
        if by_name and not owners:
            owners = {_normalize(module)}
        if not owners & declared:
            bad.append(f"{module} (imported in {where.name}; installed by {sorted(owners) or 'nothing'})")
    return bad


# Modules imported only on an optional path, by the extra that installs what they import: nothing
# else imports them at module level (checked below), and a CPU engine never imports the Triton
# ones (tests/test_triton_executor.py).
OPTIONAL = {"gpu": ("kernels/triton/", "attention/triton_executor.py"), "lm-eval": ("integrations/lm_eval.py",),
            "ray": ("ray.py", "distributed/ray_runner.py")}
OPTIONAL_TESTS = {ROOT / "tests" / "test_lm_eval.py": "lm-eval", ROOT / "tests" / "test_ray.py": "ray"}


def _extra_of(f: Path) -> str | None:
    rel = f.relative_to(PACKAGE).as_posix()
    return next((extra for extra, prefixes in OPTIONAL.items() if rel.startswith(prefixes)), None)


def test_package_imports_come_from_its_dependencies() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    imports = _third_party_imports([f for f in files if _extra_of(f) is None], {"batchllm"})
    assert {"torch", "numpy"} <= set(imports)  # the walk sees imports at all
    assert _undeclared(imports, _declared()) == []
    for extra in OPTIONAL:
        optional = _third_party_imports([f for f in files if _extra_of(f) == extra], {"batchllm"})
        assert optional and _undeclared(optional, _declared(extra), by_name=True) == [], extra


def test_optional_modules_are_imported_only_on_their_path() -> None:
    """No core module imports an optional one at module level (they are imported where used)."""
    files = sorted(PACKAGE.rglob("*.py"))
    names = set()
    for f in files:
        if _extra_of(f) is not None:
            parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert names
    for f in files:
        if _extra_of(f) is not None:
            continue
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not set(mods) & names, f"{f.name} imports {mods} at module level"


def test_test_imports_come_from_the_test_extra() -> None:
    tests = sorted((ROOT / "tests").glob("*.py"))
    local = {"batchllm"} | {f.stem for f in tests}
    imports = _third_party_imports([f for f in tests if f not in OPTIONAL_TESTS], local)
    assert {"pytest", "transformers"} <= set(imports)
    assert _undeclared(imports, _declared("test")) == []
    for f, extra in OPTIONAL_TESTS.items():
        assert _undeclared(_third_party_imports([f], local), _declared("test", extra), by_name=True) == []


def test_an_undeclared_import_is_caught(tmp_path: Path) -> None:
    """The check above can fail: a module importing a package outside the declared set is named."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import pytest\n")
    assert _undeclared(_third_party_imports([f], set()), {"torch"}) != []


def _readme_commands() -> list[str]:
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.setup_commands((ROOT / "README.md").read_text())


def test_readme_has_the_two_setup_commands_ci_runs() -> None:
    install, tests = _readme_commands()
    assert "pip install -e ." in install and install.endswith("batchllm demo")
    assert 'pip install -e ".[test]"' in tests and tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_commands.py README.md" in ci and "pip install" not in ci


@pytest.mark.parametrize("code", [
    "import batchllm, batchllm.cli, batchllm.planner, batchllm.sampling_params",
    "from batchllm.cli import main; main(['--help'])",
    "from batchllm.cli import main; main(['plan', '--help'])",
    "import batchllm.distributed.bins, batchllm.distributed.resources, batchllm.distributed.stats",
])
def test_light_entry_points_do_not_import_torch(code: str) -> None:
    """`sys.modules['torch'] = None` makes any import of torch fail, so these paths never touch it."""
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.modules['torch'] = None\n{code}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_llm_is_still_importable_from_the_package() -> None:
    from batchllm import LLM
    from batchllm.llm import LLM as Direct

    assert LLM is Direct
    with pytest.raises(AttributeError):
        import batchllm

        batchllm.no_such_name  # noqa: B018


def test_plan_command_runs_without_torch(model_factory, tmp_path: Path) -> None:
    """`batchllm plan` tokenizes, validates and plans a file with torch unimportable."""
    model = model_factory("llama")
    plan_without_torch(model, tmp_path)
