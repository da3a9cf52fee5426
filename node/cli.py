"""staik-node serve | prepare-standins (thin: parse arguments, call the library)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from node import keys_cli


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from node.accounts import open_store
    from node.app import create_app
    from node.config import Settings, load_models
    from node.draining import DrainingServer

    settings = Settings.from_env(models_file=args.models, host=args.host, port=args.port)
    specs = load_models(settings.models_file.read_text(), settings.models_dir)
    store = open_store(settings.db_path, settings.redis_url, settings.daily_reset_tz)
    app = create_app(settings, specs, store)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        # The drain already waited for requests in flight; this only bounds what is left.
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    DrainingServer(config, app.state.drain, settings.drain_timeout_s).run()
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from node.config import Settings
    from node.standins import prepare

    settings = Settings.from_env(models_dir=args.models_dir)
    for folder in prepare(settings.models_dir):
        print(folder)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="staik-node")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI routes")
    serve.add_argument("--models", type=Path, help="models.yaml (default: STAIK_MODELS_FILE)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=_serve)

    prep = sub.add_parser("prepare-standins", help="make the CPU stand-in models offline")
    prep.add_argument("--models-dir", type=Path)
    prep.set_defaults(func=_prepare)

    keys_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
