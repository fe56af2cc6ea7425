"""The README's commands and code are the ones that work."""

import os
import re
from pathlib import Path

from testkit import needs_shared

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command_after_the_lint():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, "the first screen gives exactly two set-up commands"
    install, test = commands[1].split(" && ")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    # CI runs the README's install, then the lint, then the README's test command, each on its own line.
    assert ci.index(install) < ci.index("ruff check src tests benchmarks") < ci.index(test)


@needs_shared
def test_readme_python_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the example's paths are relative to the project root
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert "tensor(" in capsys.readouterr().out
