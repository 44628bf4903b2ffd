"""``cattune`` command line: one sub-command per pipeline stage.

Each command is a module of ``cattune.commands`` with ``build_parser()`` (an
``argparse.ArgumentParser``) and ``run(args) -> int``; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line description)
COMMANDS = {
    "stg": ("cattune.commands.stg", "generate the Spurious Token Game benchmark (E or H) as JSONL files"),
    "annotate": ("cattune.commands.annotate", "write causal annotations with an assistant LLM or rules"),
    "train": ("cattune.commands.train", "fine-tune a causal LM with CAT (or plain, with --cat_gamma 0)"),
    "eval": ("cattune.commands.eval", "evaluate a model on JSONL test sets: accuracy table and JSON"),
    "demo": ("cattune.commands.demo", "STG_E: plain fine-tuning vs CAT on the embedded tiny model, IID vs OOD"),
    "experiment": ("cattune.commands.experiment", "run a grid of tasks x models x {baseline, CAT, placebo} x seeds"),
    "explain": ("cattune.commands.explain", "attention heatmap of a record's answer rows, causal spans marked"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: cattune COMMAND [options]   (cattune COMMAND --help for each command's options)",
        "",
        "Causal Attention Tuning: fine-tune language models to attend to the causes of an answer.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"cattune {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cattune: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = module.build_parser()
    parser.prog = f"cattune {name}"
    try:
        if hasattr(module, "parse"):  # commands built on HfArgumentParser parse dataclasses
            args = module.parse(parser, rest)
        else:
            args = parser.parse_args(rest)
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cattune ... | head`: the reader left, not an error of ours
        sys.stderr.close()
        return 0
    except OSError as e:  # an unreadable input, an unwritable output, a full disk: name the path
        where = f"{e.filename}: " if e.filename and str(e.filename) not in str(e.strerror or "") else ""
        print(f"cattune {name}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as e:
        print(f"cattune {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
