"""The house: imports point down (benchmarks > perception_r1 > the roles, independent of each other >
core), no import cycle between the modules of a package, the RL math, reward rules and driver loop free
of Ray and vLLM (import-linter contracts in pyproject.toml), and the README's layout tree naming every
module that exists and none that does not."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "actors", "learner", "judge", "replay", "dataprep", "evaluation", "perception_r1", "benchmarks")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                                     "sys.exit(lint_imports(no_cache=True, no_logo=True))"]
    return subprocess.run(command, cwd=root, env={"PYTHONPATH": str(root), "PATH": ""}, capture_output=True,
                          text=True, timeout=120)


def test_imports_point_down_without_cycles():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_the_contracts_catch_an_upward_import_a_cycle_and_ray_in_the_loop(tmp_path):
    """Planted in a copy of the tree: a lazy upward import, a cycle inside `core`, Ray in the driver's loop."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "core" / "records.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _planted():\n    from perception_r1 import driver  # noqa\n")
    with open(tmp_path / "core" / "config.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _planted():\n    from core import config_files  # noqa\n")
    with open(tmp_path / "perception_r1" / "orchestrator.py", "a", encoding="utf-8") as f:
        f.write("\n\nimport ray  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 kept, 3 broken" in result.stdout, result.stdout
    assert "core.records -> perception_r1.driver" in result.stdout
    assert "perception_r1.orchestrator is not allowed to import ray" in result.stdout


def layout_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout"):]
    return re.search(r"```\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_layout_names_every_module_and_only_those():
    """Under each `package/` line, indented lines name its modules (`a.py` or `a.py, b.py`), then, after
    two or more spaces, say what they hold."""
    named: dict[str, set[str]] = {}
    package = None
    for line in layout_block().splitlines():
        if not line.startswith(" "):
            package = line.split("/")[0] if line.split("/")[0] in PACKAGES else None
            if package:
                named[package] = set()
        elif package:
            names = re.split(r"\s{2,}", line.strip())[0]
            named[package] |= set(re.findall(r"[a-z_0-9]+\.py", names))
    for package in PACKAGES:
        files = {p.name for p in (REPO / package).glob("*.py") if p.name != "__init__.py"}
        assert package in named, f"README's layout has no {package}/ block"
        assert named[package] == files, (f"{package}/: README names {sorted(named[package] - files)} that do not "
                                         f"exist and misses {sorted(files - named[package])}")
