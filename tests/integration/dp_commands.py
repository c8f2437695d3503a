"""Several `workbench` commands in one process, for one torchrun launch (one startup):
`torchrun ... tests/integration/dp_commands.py sample ARGS... ";;" activations ARGS...`."""

import sys

from workbench.cli.main import main

if __name__ == "__main__":
    argv = [a for a in sys.argv[1:2] if a != "--"] + sys.argv[2:]
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == ";;":
            commands.append([])
        else:
            commands[-1].append(arg)
    for command in commands:
        code = main(command)
        if code:
            sys.exit(code)
