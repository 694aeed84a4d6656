"""`hf-fusion methods` and `hf-fusion pools`: what can be fused, and with what."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from hf_fusion.cli.arguments import add_common


def register(sub: Any) -> None:
    """Adds this module's commands to the ``hf-fusion`` parser."""
    methods = sub.add_parser("methods", help="list fusion methods with their parameters and defaults")
    methods.add_argument("name", nargs="?", help="show one method in detail")
    methods.add_argument("--json", action="store_true", help="machine-readable output")
    methods.add_argument("--markdown", action="store_true", help="the methods table of docs/methods.md")
    add_common(methods)
    methods.set_defaults(run=cmd_methods)

    pools = sub.add_parser("pools", help="list the model pools: FusionBench's and the built-in ones")
    pools.add_argument("name", nargs="?", help="show one pool's base, experts and tasks")
    pools.add_argument("--json", action="store_true", help="machine-readable output")
    add_common(pools)
    pools.set_defaults(run=cmd_pools)


def format_default(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, dict, str)) else str(value)


def methods_markdown(specs: Sequence[Any]) -> str:
    """One table row per method: name and aliases, what it needs, parameters with defaults, the paper."""
    rows = ["| method (aliases) | family | data | base | parameters (defaults) | paper |", "|---|---|---|---|---|---|"]
    for s in specs:
        names = f"`{s.name}`" + (f" ({', '.join(s.aliases)})" if s.aliases else "")
        params = ", ".join(f"`{p.name}={format_default(p.default)}`" for p in s.parameters()) or "-"
        paper = f"[{s.paper.title.split(' (')[0]}]({s.paper.url})" if s.paper else ""
        rows.append(f"| {names} | {s.family.value} | {s.data.value} | {s.base.value} | {params} | {paper} |")
    return "\n".join(rows)


def cmd_methods(args: argparse.Namespace) -> int:
    from hf_fusion.registry import all_methods, get_method

    specs = [get_method(args.name)] if args.name else all_methods()
    if args.json:
        out = [
            {
                "name": s.name,
                "aliases": list(s.aliases),
                "family": s.family.value,
                "data": s.data.value,
                "base": s.base.value,
                "summary": s.summary,
                "paper": s.paper.url if s.paper else None,
                "parameters": [
                    {
                        "name": p.name,
                        "type": p.type,
                        "default": p.default,
                        "range": p.range_text(),
                        "description": p.description,
                    }
                    for p in s.parameters()
                ],
            }
            for s in specs
        ]
        print(json.dumps(out, indent=2))
        return 0
    if args.markdown:
        print(methods_markdown(specs))
        return 0
    if args.name:
        s = specs[0]
        print(f"{s.name}  ({s.family.value}; data: {s.data.value}; base: {s.base.value})")
        print(f"  {s.summary}")
        if s.aliases:
            print(f"  aliases: {', '.join(s.aliases)}")
        if s.paper:
            print(f"  paper: {s.paper.title}\n         {s.paper.url}")
        for p in s.parameters():
            rng = f" {p.range_text()}" if p.range_text() else ""
            print(f"  --param {p.name}={format_default(p.default)}  ({p.type}{rng}) {p.description}")
        return 0
    rows = [("METHOD", "FAMILY", "DATA", "BASE", "PARAMETERS (defaults)")]
    for s in specs:
        params = " ".join(f"{p.name}={format_default(p.default)}" for p in s.parameters()) or "-"
        rows.append((s.name, s.family.value, s.data.value, s.base.value, params))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    print("\n`hf-fusion methods NAME` shows ranges, aliases and the paper.")
    return 0


def cmd_pools(args: argparse.Namespace) -> int:
    from hf_fusion.catalog import get_pool, pool_names

    pools = [get_pool(n) for n in ([args.name] if args.name else pool_names())]
    if args.json:
        print(json.dumps([p.model_dump() for p in pools], indent=2))
        return 0
    if args.name:
        pool = pools[0]
        print(f"{pool.name}: {pool.description}\n  base: {pool.base}\n  source: {pool.source}")
        if pool.heads:
            print(f"  heads (kept per task): {', '.join(pool.heads)}")
        for spec in pool.tasks:
            data = spec.dataset + (f" ({spec.config})" if spec.config else "") + f" [{spec.split}]"
            print(f"  {spec.name:18s} {pool.experts[spec.name]}\n  {'':18s} {spec.kind}, {spec.metric} on {data}")
        return 0
    rows = [("POOL", "TASKS", "KIND", "BASE")]
    rows += [(p.name, str(len(p.tasks)), p.tasks[0].kind, p.base) for p in pools]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("\n`hf-fusion pools NAME` lists a pool's experts and datasets.")
    return 0
