"""CLI commands; each module has build_parser() and run(args)."""
