"""`python -m e6score_dagster.synthetic --world NAME --posts N --date D --out DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from e6score_dagster.synthetic.generate import generate_dump
from e6score_dagster.synthetic.worlds import DEFAULT_WORLD, HELD_BACK_WORLD, WORLDS


def main(argv: list[str] | None = None) -> None:
    worlds = "; ".join(f"{w.name}: {w.summary}" for w in WORLDS.values())
    parser = argparse.ArgumentParser(
        description="Write a synthetic e621-style dump (posts, tags, pools, truth parquet).",
        epilog=f"Worlds ({HELD_BACK_WORLD} is held back: never tune on it): {worlds}",
    )
    parser.add_argument("--posts", type=int, required=True)
    parser.add_argument("--date", required=True, help="dump date, YYYY-MM-DD")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tags", type=int, default=None, help="vocabulary size")
    parser.add_argument("--world", choices=list(WORLDS), default=DEFAULT_WORLD)
    args = parser.parse_args(argv)
    paths = generate_dump(args.out, args.posts, args.date, args.seed, args.tags, args.world)
    for kind, path in paths.items():
        print(f"{kind}\t{path}\t{path.stat().st_size}")
