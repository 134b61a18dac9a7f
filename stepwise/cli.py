"""The ``stepwise`` command line. Each subcommand lives beside the code it drives.

Errors a user can fix (bad config, missing corpus, unreachable server) print one line to
stderr and exit with status 2; there is no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from stepwise.errors import StepwiseError

log = logging.getLogger("stepwise")

Handler = Callable[[argparse.Namespace], int]


def _config_command(args: argparse.Namespace) -> int:
    from stepwise.config import load_config

    config = load_config(args.config, args.set)
    print(config.to_json())
    return 0


def _corpus_command(args: argparse.Namespace) -> int:
    from stepwise.config import load_config
    from stepwise.data import SPLITS, load_split

    config = load_config(args.config, args.set)
    for split in SPLITS:
        pairs = load_split(config.data, split)
        print(f"{split}\t{len(pairs)} pairs")
        if pairs and args.show:
            for src, tgt in pairs[: args.show]:
                print(f"  {src}\n  -> {tgt}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="stepwise", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=None, help="JSON config (default: built-in defaults)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. model.d_model=512 (repeatable)")
        return p

    p = with_config(sub.add_parser("config", help="validate a config and print it with defaults filled in"))
    p.set_defaults(handler=_config_command)
    p = with_config(sub.add_parser("corpus", help="load the configured corpus and print split sizes"))
    p.add_argument("--show", type=int, default=0, help="print the first N pairs of each split")
    p.set_defaults(handler=_corpus_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stepwise`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except StepwiseError as exc:
        print(f"stepwise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stepwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
