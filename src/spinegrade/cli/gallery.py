"""``spinegrade gallery``: look at the crops of a prepared cache."""

from __future__ import annotations

import argparse

from spinegrade.errors import UserError
from spinegrade.io.paths import check_output_file

EXAMPLES = """\
examples:
  spinegrade gallery cache/ --out crops.png
  spinegrade gallery cache/spinal_canal_stenosis-1a2b3c4d --per-class 3 --seed 1
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gallery", help="draw a few cached crops of each class into one PNG",
        description=(
            "Draw PER_CLASS random samples of each class (Normal/Mild, Moderate, Severe) from "
            "a cache made by 'spinegrade prepare': every slice (columns, offset from the "
            "labeled slice) and every window channel (rows) of each crop, captioned with "
            "class, level and study."
        ),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("cache", metavar="CACHE",
                   help="a cache folder, or a cache root holding exactly one")
    p.add_argument("--per-class", type=int, default=5, help="samples per class (default 5)")
    p.add_argument("--out", default="crops.png", help="PNG to write (default crops.png)")
    p.add_argument("--seed", type=int, default=0, help="which samples are drawn")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: build_parser imports every command module, and matplotlib would
    # slow down every other command's start.
    from spinegrade.data.cache import CropCache
    from spinegrade.report.gallery import channel_names, make_gallery

    if args.per_class < 1:
        raise UserError("--per-class must be at least 1")
    check_output_file(args.out)
    cache = CropCache.open(args.cache)
    out = make_gallery(cache.crops, cache.index, args.out, per_class=args.per_class,
                       names=channel_names(cache.data_cfg), seed=args.seed,
                       title=f"{cache.path.name}: {len(cache)} crops")
    print(f"wrote {out}")
    return 0
