"""The command layer: one module per ``cattune`` command, each with ``build_parser()``
and ``run(args) -> int`` (and ``parse(parser, argv)`` where HfArgumentParser parses
dataclasses). Library modules never import from here."""
