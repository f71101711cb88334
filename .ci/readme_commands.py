"""Print the README's set-up commands, one a line: the fenced bash blocks of its "## Set up" section.

CI runs exactly these, so the README and CI cannot drift apart. Exits non-zero unless the section
holds exactly two one-line commands (install + demo, then the tests)."""

import re
import sys
from pathlib import Path


def setup_commands(readme: str) -> list[str]:
    section = re.search(r"^## Set up\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    if section is None:
        raise ValueError('README.md has no "## Set up" section')
    blocks = re.findall(r"^```(?:bash|sh)\n(.*?)^```", section.group(1), re.M | re.S)
    commands = [b.strip() for b in blocks]
    if len(commands) != 2 or any(not c or "\n" in c for c in commands):
        raise ValueError(f'"## Set up" must hold exactly two one-line bash blocks, found {commands!r}')
    return commands


if __name__ == "__main__":
    try:
        print("\n".join(setup_commands(Path(sys.argv[1]).read_text(encoding="utf-8"))))
    except ValueError as e:
        sys.exit(f"readme_commands: {e}")
