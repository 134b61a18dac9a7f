"""The ``stepwise`` command line. Each subcommand lives beside the code it drives.

Errors a user can fix (``stepwise.errors``: a bad config, a missing corpus, an unknown model id,
tag or checkpoint, a corrupt checkpoint, an unreachable server) print one line to stderr and exit
with status 2; there is no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
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
    from stepwise.train.data import SPLITS, load_split

    config = load_config(args.config, args.set)
    if args.upload:
        from stepwise.train.data import upload_corpus

        version = upload_corpus(config.data, args.upload, alignments=args.alignments)
        print(f"ClearML dataset {args.upload}: new version {version}")
        return 0
    for split in SPLITS:
        pairs = load_split(config.data, split)
        print(f"{split}\t{len(pairs)} pairs")
        if pairs and args.show:
            for src, tgt in pairs[: args.show]:
                print(f"  {src}\n  -> {tgt}")
    return 0


def _clearml_server_command(args: argparse.Namespace) -> int:
    if args.list_endpoints:
        from stepwise.clearml_server.services import implemented_endpoints

        print("\n".join(implemented_endpoints()))
        return 0
    from stepwise.clearml_server.server import DataInUse, InsecureBind, serve

    try:
        serve(host=args.host, port=args.port, data_dir=args.data, trace=args.trace, access_key=args.access_key,
              secret_key=args.secret_key, allowed_hosts=tuple(args.allow_host))
    except (InsecureBind, DataInUse) as exc:
        raise StepwiseError(str(exc)) from None
    except OSError as exc:
        raise StepwiseError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return 0


def _clearml_status_command(args: argparse.Namespace) -> int:
    from stepwise.registry import client as registry
    from stepwise.registry import tracking

    host = tracking.check_server()
    from clearml.backend_api import Session
    from clearml.backend_api.session.session import LoginError

    try:
        session = Session()
    except LoginError as exc:
        raise tracking.ClearMLUnavailable(f"ClearML server {host} refused the login: {exc}") from None
    print(f"ClearML server {host}: api {Session.api_version}, server {Session.server_version}, "
          f"files {session.get_files_server_host()}")
    if args.project:
        print(f"project {args.project!r}: {len(registry.list_versions(project=args.project))} registered model(s)")
    return 0


def _models_list_command(args: argparse.Namespace) -> int:
    import json

    from stepwise.registry import client as registry

    versions = registry.list_versions(project=args.project, name=args.name, tag=args.tag)
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=2))
        return 0
    if not versions:
        print("no registered versions match")
        return 0
    print(f"{'id':32}  {'name':24}  {'created':19}  {'tags':22}  {'published':9}  {'step':>7}  {'BLEU':>6}")
    for v in versions:
        bleu = "" if v.bleu is None else f"{v.bleu:.2f}"
        print(f"{v.id:32}  {v.name[:24]:24}  {v.created[:19]:19}  {','.join(v.tags)[:22]:22}  "
              f"{'yes' if v.published else 'no':9}  {v.metadata.get('step', ''):>7}  {bleu:>6}")
    return 0


def _promote_command(args: argparse.Namespace) -> int:
    from stepwise.registry.promotion import PromotionRefused, promote

    try:
        result = promote(args.model_id, tag=args.tag, margin=args.margin, force=args.force, publish=args.publish,
                         split=args.split, sentences=args.sentences)
    except PromotionRefused as exc:
        print(f"stepwise: promotion refused: {exc}", file=sys.stderr)
        return 1
    current = "none" if result.current_id is None else f"{result.current_id} BLEU {result.current_bleu:.2f}"
    print(f"promoted {args.model_id} to {args.tag!r}: candidate BLEU {result.candidate_bleu:.2f}, "
          f"previous {current} ({result.split}, {result.sentences} sentences)")
    return 0


def _demote_command(args: argparse.Namespace) -> int:
    from stepwise.registry import client as registry

    if not registry.remove_tag(args.model_id, args.tag):
        raise StepwiseError(f"model {args.model_id} does not carry the tag {args.tag!r}")
    print(f"removed {args.tag!r} from {args.model_id}")
    return 0


def _evaluate_command(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from stepwise.errors import InvalidRequest
    from stepwise.registry import client as registry
    from stepwise.train.checkpoint import load_checkpoint
    from stepwise.train.data import load_split
    from stepwise.train.evaluate import evaluate_bleu, tune_length_penalty

    if args.tune_length_penalty and args.beam < 2:
        raise InvalidRequest("needs --beam 2 or more (greedy search has no length penalty)",
                             field="--tune-length-penalty")
    if Path(args.model).is_file() or Path(args.model).suffix == ".pt" or os.sep in args.model:
        path, label = Path(args.model), args.model  # a missing file is ModelNotFound from load_checkpoint
    elif args.model in (registry.PRODUCTION, registry.CANDIDATE) or args.model.startswith("tag:"):
        tag = args.model.removeprefix("tag:")
        resolved = registry.resolve(args.project, args.name, tag=tag)
        path, label = resolved.path, f"{resolved.version.id} ({tag})"
    else:
        path, label = registry.download(args.model), args.model
    checkpoint = load_checkpoint(path)
    pairs = load_split(checkpoint.config.data, args.split)
    model, tokenizer, alpha = checkpoint.build_model(), checkpoint.tokenizer(), args.length_penalty
    if args.tune_length_penalty:  # on the validation split, whatever split is then scored
        alpha, scores = tune_length_penalty(model, tokenizer, load_split(checkpoint.config.data, "valid"),
                                            beam_size=args.beam)
        print("length penalty on valid: " + ", ".join(f"{a:g} -> {b:.2f}" for a, b in scores.items())
              + f"; chosen {alpha:g}")
    started = time.monotonic()
    bleu, hypotheses = evaluate_bleu(model, tokenizer, pairs, beam_size=args.beam, limit=args.limit,
                                     length_penalty=alpha)
    elapsed = time.monotonic() - started
    penalty = f", length penalty {alpha:g}" if args.beam > 1 else ""
    print(f"{label}: sacreBLEU {bleu:.2f} on {args.split} ({len(hypotheses)} sentences, beam {args.beam}{penalty}, "
          f"step {checkpoint.step}, {elapsed:.1f}s)")
    if args.show:
        for (src, ref), hyp in list(zip(pairs, hypotheses))[: args.show]:
            print(f"  src: {src}\n  ref: {ref}\n  hyp: {hyp}")
    return 0


def _average_command(args: argparse.Namespace) -> int:
    from stepwise.train.averaging import average_last

    averaged = average_last(args.sources, args.out, last=args.last)
    print(f"averaged steps {', '.join(map(str, averaged.data_state['averaged_steps']))} into {args.out}")
    return 0


def _export_command(args: argparse.Namespace) -> int:
    import json

    from stepwise.export import export_from_registry

    chosen = [x for x in (args.tag, args.model_id, args.checkpoint) if x]
    if len(chosen) > 1:
        raise StepwiseError("give at most one of --tag, --model-id, --checkpoint")
    manifest = export_from_registry(args.out, project=args.project, name=args.name, tag=args.tag,
                                    model_id=args.model_id, checkpoint_path=args.checkpoint,
                                    register=not args.no_register and args.checkpoint is None, opset=args.opset)
    print(json.dumps({"out": args.out, "source": manifest.get("source_model", {}).get("id"),
                      "registered_id": manifest.get("registered_id"), "parity": manifest["parity"],
                      "export_seconds": manifest["export_seconds"]}, indent=2))
    return 0


def _up_command(args: argparse.Namespace) -> int:
    from stepwise.pipeline import Pipeline

    return Pipeline(config=args.config, project=args.project, clearml_port=args.clearml_port,
                    service_port=args.port, explorer_port=args.explorer_port,
                    train_minutes=args.train_minutes, state_dir=args.state_dir,
                    overrides=args.set).run(wait=not args.no_wait)


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
    p.add_argument("--upload", default=None, metavar="PROJECT/NAME",
                   help="put the splits into a new version of this ClearML dataset (train data.dataset=PROJECT/NAME)")
    p.add_argument("--alignments", action="store_true",
                   help="with --upload: add eflomal's word alignments of the training split (train.align), "
                        "which guided alignment then reads instead of aligning")
    p.set_defaults(handler=_corpus_command)
    p = sub.add_parser("clearml-server", help="run the local ClearML server (API, file server, registry)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8008, help="port (default 8008)")
    p.add_argument("--data", default=".stepwise/clearml", help="directory for the SQLite file and uploads")
    p.add_argument("--trace", default=None, help="append every API answer to this JSON-lines file (tokens left out)")
    p.add_argument("--access-key", default=None,
                   help="access key to accept (default: STEPWISE_CLEARML_ACCESS_KEY, else the local default on "
                        "loopback, else one generated into DATA/credentials.json)")
    p.add_argument("--secret-key", default=None,
                   help="secret to accept (default: STEPWISE_CLEARML_SECRET_KEY, else as for --access-key); "
                        "the documented default is refused off loopback")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a name clients reach this server by (Host header), besides loopback and IP addresses; "
                        "repeatable")
    p.add_argument("--list-endpoints", action="store_true",
                   help="print the implemented API endpoints (service.action, sorted) and exit")
    p.set_defaults(handler=_clearml_server_command)
    p = sub.add_parser("clearml-status", help="check that the configured ClearML server answers and accepts us")
    p.add_argument("--project", default=None, help="also count the registered models of this project")
    p.set_defaults(handler=_clearml_status_command)

    models = sub.add_parser("models", help="the model registry").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", help="registered versions, newest first")
    p.add_argument("--project", default=None, help="only this ClearML project")
    p.add_argument("--name", default=None, help="only this model name")
    p.add_argument("--tag", default=None, help="only versions carrying this tag")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_models_list_command)

    p = sub.add_parser("promote", help="give a version a tag (default production) after a BLEU gate on the ONNX "
                                       "exports of it and of the current holder")
    p.add_argument("model_id", help="the version to promote")
    p.add_argument("--tag", default="production", help="tag to move (default production)")
    p.add_argument("--margin", type=float, default=1.0, help="refuse if BLEU drops by more than this (default 1)")
    p.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    p.add_argument("--publish", action="store_true", help="also publish the version")
    p.add_argument("--split", default="valid", choices=["valid", "test"], help="held-out split for the gate")
    p.add_argument("--sentences", type=int, default=100, help="sentences the gate scores (default 100)")
    p.set_defaults(handler=_promote_command)

    p = sub.add_parser("demote", help="remove a tag (default production) from a version")
    p.add_argument("model_id")
    p.add_argument("--tag", default="production")
    p.set_defaults(handler=_demote_command)

    p = sub.add_parser("evaluate", help="sacreBLEU of a checkpoint or registered version on a split")
    p.add_argument("model", help="a checkpoint file, a model id, or a tag (production, candidate, tag:NAME)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--beam", type=int, default=4, help="beam size (default 4; 1 = greedy)")
    p.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    p.add_argument("--project", default=None, help="project for tag lookups")
    p.add_argument("--name", default=None, help="model name for tag lookups")
    p.add_argument("--show", type=int, default=0, help="print N example translations")
    p.add_argument("--length-penalty", type=float, default=0.6, help="beam search's GNMT alpha (default 0.6)")
    p.add_argument("--tune-length-penalty", action="store_true",
                   help="pick the length penalty with the best BLEU on the validation split, then score --split")
    p.set_defaults(handler=_evaluate_command)

    p = sub.add_parser("average", help="average the weights of a run's last saves into one checkpoint")
    p.add_argument("sources", nargs="+", help="a run folder (its checkpoints/step-*.pt) or checkpoint files")
    p.add_argument("--last", type=int, default=None, help="average the newest N saves (default: all given)")
    p.add_argument("-o", "--out", required=True, help="the averaged checkpoint to write")
    p.set_defaults(handler=_average_command)

    p = sub.add_parser("export", help="compile a registered version (or a checkpoint) to ONNX, check parity")
    p.add_argument("--project", default=None, help="ClearML project to search")
    p.add_argument("--name", default=None, help="model name to search")
    p.add_argument("--tag", default=None, help="export the newest version with this tag (default production)")
    p.add_argument("--model-id", default=None, help="export this registered version")
    p.add_argument("--checkpoint", default=None, help="export a local checkpoint file (not registered)")
    p.add_argument("--out", default="exports/current", help="export directory (default exports/current)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--no-register", action="store_true", help="do not register the export in ClearML")
    p.set_defaults(handler=_export_command)

    p = sub.add_parser("up", help="the main job: server, training if needed, promotion, export, service, explorer")
    p.add_argument("--config", default=None, help="preset trained when nothing is in production (default "
                   "the preset tiny on CPU, default with a CUDA GPU; a preset name or a JSON file)")
    p.add_argument("--project", default="stepwise", help="ClearML project")
    p.add_argument("--clearml-port", type=int, default=8008, help="port of the local ClearML server")
    p.add_argument("--port", type=int, default=3000, help="port of the translation service")
    p.add_argument("--explorer-port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
                   help="port of the explorer (default GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--train-minutes", type=float, default=None,
                   help="override the preset's training time (a warmup longer than it becomes a tenth of it)")
    p.add_argument("--state-dir", default=".stepwise", help="ClearML data, runs, exports and logs (default .stepwise)")
    p.add_argument("--no-wait", action="store_true", help="stop everything once it is up (a smoke test)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the preset it trains, e.g. train.save_every=100 (repeatable)")
    p.set_defaults(handler=_up_command)

    sub.add_parser("train", help="train a model (see `stepwise train --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stepwise`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from stepwise.train.trainer import main as train_main

        return train_main(argv[1:])
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
