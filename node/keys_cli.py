"""`staik-node keys ...`: manage API keys in the node's store (SQLite, or Redis if configured)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from node.accounts import PLANS, KeyNotFound, Store, custom_plan, get_plan, open_store
from node.config import Settings


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, list, revoke, top up API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)

    create = ksub.add_parser("create", help="print a new key (shown once)")
    create.add_argument("--plan", required=True, choices=[*PLANS, "custom"])
    create.add_argument("--name")
    create.add_argument("--tokens", type=int, help="override the plan's limit or balance")
    create.add_argument("--limit-tokens", type=int, help="custom plan: tokens per window")
    create.add_argument("--window", choices=["day", "hour"], help="custom plan: the window")

    ksub.add_parser("list", help="every key, without secrets")
    for name, text in (("revoke", "revoke a key"), ("usage", "where a key stands now")):
        p = ksub.add_parser(name, help=text)
        p.add_argument("key", metavar="KEY_OR_ID")
    topup = ksub.add_parser("topup", help="add purchased tokens to a pay-as-you-go key")
    topup.add_argument("key", metavar="KEY_OR_ID")
    topup.add_argument("tokens", type=int)
    keys.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    store = open_store(settings.db_path, settings.redis_url, settings.daily_reset_tz)
    try:
        return asyncio.run(_run(args, store))
    except (KeyNotFound, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, store: Store) -> int:
    try:
        match args.keys_command:
            case "create":
                if args.plan == "custom":
                    if args.limit_tokens is None or not args.window:
                        raise ValueError("a custom plan needs --limit-tokens and --window")
                    plan = custom_plan(args.limit_tokens, args.window)
                else:
                    plan = get_plan(args.plan)
                secret, record = await store.create_key(plan, args.name, args.tokens)
                print(secret)
                print(json.dumps(_record(record)), file=sys.stderr)
            case "list":
                for record in await store.list_keys():
                    print(json.dumps(_record(record)))
            case "revoke":
                if not await store.revoke(args.key):
                    raise KeyNotFound(args.key)
                print(f"revoked {args.key if args.key.startswith('key_') else 'the key'}")
            case "topup":
                print(json.dumps(_record(await store.topup(args.key, args.tokens))))
            case "usage":
                record = await store.get_key(args.key)
                if record is None:
                    raise KeyNotFound(args.key)
                usage = await store.usage(record.id, time.time())
                print(json.dumps({**_record(record), **asdict(usage)}))
        return 0
    finally:
        await store.close()


def _record(record: Any) -> dict[str, Any]:
    out = asdict(record)
    out["window"] = str(out["window"])
    return out
