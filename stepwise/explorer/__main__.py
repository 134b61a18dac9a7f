"""``python -m stepwise.explorer --api http://127.0.0.1:3000 [--port P] [--model-name NAME] [--admin]``.

The port defaults to ``GRADIO_SERVER_PORT``, then 7860. The registry, training and diff views
read the ClearML server the ``CLEARML_*`` variables (or ``~/clearml.conf``) point at. ``--admin``
adds promote and demote to the registry view; without it the page changes nothing. The process
needs no torch: translations come from the service, and promotion scores the versions' ONNX
exports with ONNX Runtime (:mod:`stepwise.registry.promotion`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from stepwise.explorer.app import build_app
from stepwise.registry import tracking
from stepwise.serve.client import TranslationClient


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepwise.explorer", description="stepwise attention explorer")
    parser.add_argument("--api", default="http://127.0.0.1:3000", help="URL of the translation service")
    parser.add_argument("--port", type=int, default=None, help="port (default: GRADIO_SERVER_PORT, then 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--model-name", default="", help="model name the registry view lists (default: every name)")
    parser.add_argument("--admin", action="store_true",
                        help="allow promoting and demoting versions from the registry view (needs ClearML credentials)")
    args = parser.parse_args(argv)
    if args.admin and not tracking.is_configured():
        print("stepwise.explorer: error: --admin needs a ClearML server: set CLEARML_API_HOST and the "
              "CLEARML_API_ACCESS_KEY/CLEARML_API_SECRET_KEY credentials (or ~/clearml.conf)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = args.port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    demo = build_app(TranslationClient(args.api), admin=args.admin, model_name=args.model_name)
    signal.signal(signal.SIGTERM, _exit)  # a normal exit on SIGTERM, so the app's temporary folders are removed
    mode = "admin: promotion enabled" if args.admin else "read-only"
    print(f"attention explorer on http://{args.host}:{port} (service {args.api}, {mode})", flush=True)
    try:
        demo.launch(server_name=args.host, server_port=port, show_error=False, quiet=True)
    except OSError as exc:
        print(f"stepwise.explorer: error: cannot listen on {args.host}:{port}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
