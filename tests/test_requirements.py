"""requirements.txt, constraints.txt, .ci/run and the README agree: ranges admit the versions that ran, every
range has its exact tested pin, CI installs the pins and runs the README's test command, and every README
command uses the project's virtual environment."""
from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def test_every_range_admits_its_exact_tested_pin_and_the_versions_that_ran_on_the_gpu():
    ranges = {canonicalize_name(r.name): r for r in map(Requirement, requirement_lines(ROOT / "requirements.txt"))}
    pins = {}
    for line in requirement_lines(ROOT / "constraints.txt"):
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
    for name, requirement in ranges.items():
        assert name in pins, f"{name} has no exact pin in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
    # Ran on the H200 image (README, Tested versions); a Kaggle / Colab CUDA torch in range is kept.
    assert ranges["torch"].specifier.contains("2.11.0") and ranges["torch"].specifier.contains("2.13.0")
    assert ranges["transformers"].specifier.contains("5.24.0")
    assert not ranges["torch"].specifier.contains("2.10.0")  # never ran here: not admitted


def test_ci_installs_the_pins_and_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-r requirements.txt -c constraints.txt" in ci
    readme = (ROOT / "README.md").read_text()
    tests_section = readme[readme.index("## Tests"):]
    command = re.search(r"```bash\n(.+?)\n```", tests_section).group(1).strip()
    assert ci.strip().splitlines()[-1] == command


def test_readme_commands_run_in_the_virtual_environment():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    bare = [c for c in commands if re.match(r"^(\S+=\S+ )*(python|torchrun|pip|pytest)\b", c)]
    assert not bare, f"commands that skip .venv: {bare}"
    assert any(c.startswith(".venv/bin/python trainloop_gpu_finetuned.py") for c in commands)
