"""The `attamba` command line: one sub-command per module, each exposing configure(parser) and run(args)."""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module with `configure(parser)` and `run(args) -> int`; imported only when used
COMMANDS = {
    "serve": ("server.serve", "run the OpenAI-compatible HTTP server"),
    "generate": ("entrypoints.generate", "stream one completion to stdout"),
    "train": ("training.train", "train a model from a config file (resumable)"),
    "uptrain": ("training.uptrain", "distil a pretrained transformer into Attamba (resumable)"),
    "eval-ppl": ("training.evaluate", "WikiText-2 perplexity as JSON"),
    "bench": ("benchmarks.cli", "throughput / memory / latency benchmarks as JSON"),
    "convert-gguf": ("models.gguf", "a GGUF Llama model (e.g. SmolLM2) to a checkpoint directory"),
}


class CLIError(Exception):
    """An error reported as one line on stderr with a non-zero exit status."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="attamba", description="Attamba serving system")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error
        parser.print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"attamba {name}", description=COMMANDS[name][1])
    module.configure(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError) as exc:
        print(f"attamba {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
