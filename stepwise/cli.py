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


def _clearml_server_command(args: argparse.Namespace) -> int:
    from stepwise.clearml_server import serve

    try:
        serve(host=args.host, port=args.port, data_dir=args.data, trace=args.trace)
    except OSError as exc:
        raise StepwiseError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return 0


def _clearml_status_command(args: argparse.Namespace) -> int:
    from stepwise import tracking

    host = tracking.check_server()
    from clearml import Model
    from clearml.backend_api import Session
    from clearml.backend_api.session.session import LoginError

    try:
        session = Session()
    except LoginError as exc:
        raise tracking.ClearMLUnavailable(f"ClearML server {host} refused the login: {exc}") from None
    print(f"ClearML server {host}: api {Session.api_version}, server {Session.server_version}, "
          f"files {session.get_files_server_host()}")
    if args.project:
        try:
            count = len(Model.query_models(project_name=args.project))
        except ValueError:  # the SDK's answer for a project that does not exist
            count = 0
        print(f"project {args.project!r}: {count} registered model(s)")
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
    p = sub.add_parser("clearml-server", help="run the local ClearML server (API, file server, registry)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8008, help="port (default 8008)")
    p.add_argument("--data", default=".stepwise/clearml", help="directory for the SQLite file and uploads")
    p.add_argument("--trace", default=None, help="append every API answer to this JSON-lines file")
    p.set_defaults(handler=_clearml_server_command)
    p = sub.add_parser("clearml-status", help="check that the configured ClearML server answers and accepts us")
    p.add_argument("--project", default=None, help="also count the registered models of this project")
    p.set_defaults(handler=_clearml_status_command)
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
