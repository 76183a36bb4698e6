"""The ``locore-plugin`` command. Each sub-command is a function that adds its parser."""
from __future__ import annotations

import argparse
import sys

from locore_plugin.bench import add_parser as add_bench_command
from locore_plugin.demo import add_demo_command
from locore_plugin.evaluation import add_eval_command, add_tune_command
from locore_plugin.extractors import add_extract_command, list_extractors
from locore_plugin.registry import list_rerankers
from locore_plugin.training import add_subcommand as add_train_command


def _add_list(subparsers):
    parser = subparsers.add_parser("list", help="list the registered re-rankers and feature extractors")

    def run(args):
        for title, entries in (("re-rankers", list_rerankers()), ("extractors", list_extractors())):
            print(f"{title}:")
            width = max((len(e.name) for e in entries), default=0)
            for e in entries:
                print(f"  {e.name:<{width}}  [{e.distribution}: {e.plugin}]  {e.description}")
        return 0

    parser.set_defaults(run=run)


SUBCOMMANDS = [_add_list, add_eval_command, add_tune_command, add_demo_command, add_extract_command, add_train_command, add_bench_command]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="locore-plugin", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
