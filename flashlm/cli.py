"""The ``flashlm`` console script: ``flashlm <command> [args]``, one module per command.

Each command module exposes ``cli(argv)``, which parses its own arguments and calls a
``main(cfg)``. Commands are imported only when run, so ``flashlm --help`` stays fast.
"""

import importlib
import sys

COMMANDS = {
    "train": ("flashlm.training.train", "train or fine-tune a model from a recipe"),
    "export": ("flashlm.hf.export", "export a flashlm checkpoint to a Hugging Face directory"),
}


def _usage():
    lines = ["usage: flashlm <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"flashlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.cli(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
