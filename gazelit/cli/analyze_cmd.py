"""`gazelit analyze`: analyses of a trained model.

  gazelit analyze comic-strips --out DIR [--count 8 --panels 4]
      write generated comic strips (PNG + strips.jsonl) to look for gaze heads with
  gazelit analyze gaze-heads RECIPE_OR_MODEL --data DIR/strips.jsonl [--top 10] [--out DIR]
      score every attention head of the LLM by how well its attention over the panels tracks the panel
      being described (mean correlation over the description tokens); prints the top heads and writes
      OUT/gaze_heads.png (layer x head heatmap) and OUT/gaze_heads.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gazelit.cli.loading import add_model_arguments, model_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="analyses: gaze-head discovery on comic strips",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    strips = kinds.add_parser("comic-strips", help="generate comic strips (images + descriptions)")
    strips.add_argument("--out", required=True, help="output folder")
    strips.add_argument("--count", type=int, default=8)
    strips.add_argument("--panels", type=int, default=4)
    strips.add_argument("--size", type=int, default=256, help="image side in pixels")
    strips.add_argument("--seed", type=int, default=0)
    strips.set_defaults(func=run_strips)

    heads = kinds.add_parser("gaze-heads", help="find the heads whose attention tracks the described region")
    add_model_arguments(heads)
    heads.add_argument("--data", required=True, metavar="PATH", help="strips.jsonl (gazelit analyze comic-strips)")
    heads.add_argument("--limit", type=int, default=None, help="use the first N strips")
    heads.add_argument("--offset", type=int, choices=(0, 1), default=0,
                       help="0: each description token's own query; 1: the query that produced it")
    heads.add_argument("--top", type=int, default=10, help="heads to print")
    heads.add_argument("--out", default="gaze_heads", help="folder for gaze_heads.png and gaze_heads.json")
    heads.set_defaults(func=run_heads)


def run_strips(args: argparse.Namespace) -> int:
    from gazelit.analysis.comic_strips import generate_strips

    path = generate_strips(args.out, args.count, args.panels, args.size, args.seed)
    print(path)
    return 0


def run_heads(args: argparse.Namespace) -> int:
    from gazelit.analysis.comic_strips import load_strips
    from gazelit.analysis.gaze_heads import find_gaze_heads, heatmap_png

    strips = load_strips(args.data)[: args.limit]
    model = model_from_args(args)
    result = find_gaze_heads(model, strips, offset=args.offset)
    print(f"gaze-head scores over {result.tokens} description tokens of {result.strips} strips")
    print(f"{'rank':>4} {'layer':>5} {'head':>4} {'score':>7}")
    for rank, (layer, head, score) in enumerate(result.top(args.top), 1):
        print(f"{rank:>4} {layer:>5} {head:>4} {score:>7.3f}")
    out = Path(args.out)
    png = heatmap_png(result.scores, out / "gaze_heads.png", top=min(args.top, 5))
    (out / "gaze_heads.json").write_text(json.dumps(result.to_dict(), indent=2))
    print(f"heatmap: {png}")
    return 0
