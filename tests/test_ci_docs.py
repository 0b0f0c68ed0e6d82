"""The README's CI section names every command `.ci/run` runs, so the two cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ci_commands(script: str) -> list[str]:
    """Each command line of the script as a reader names it: `ruff check`, `./run.sh test`,
    `bench regression`, `check_image.sh`, and each GATEWAY_* variable it exports."""
    found = []
    for line in (raw.strip() for raw in script.splitlines()):
        if line.startswith("export "):
            found += re.findall(r"(GATEWAY_\w+)=", line)
        elif line.startswith((".venv/bin/", "./run.sh ", "step9_router/")):
            found += _named(line.replace(".venv/bin/python -m ", "").replace(".venv/bin/", ""))
    return found


def _named(command: str) -> list[str]:
    words = command.split()
    if words[0] == "pip":  # installing the linters: how, not what CI checks
        return []
    if words[0].endswith(".sh") and words[0] != "./run.sh":
        return [Path(words[0]).name]
    flags = [w for w in words[2:] if w == "--check"]  # `ruff format --check`, not `ruff format`
    return [" ".join(words[:2] + flags) if len(words) > 1 and words[1][0] not in "-." else words[0]]


def readme_ci_section() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## CI") :].split("\n## ")[0]
    return " ".join(section.split())  # a name may wrap across lines


def test_the_readme_ci_section_names_every_command_of_ci_run():
    commands = ci_commands((ROOT / ".ci" / "run").read_text())
    assert {"actionlint", "ruff check", "ruff format --check", "mypy", "check_image.sh"} <= set(
        commands
    )
    section = readme_ci_section()
    missing = [c for c in commands if c not in section]
    assert not missing, f"README's CI section does not say: {missing}"
