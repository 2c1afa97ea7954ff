"""`gazelit cost`: attention cost per decoding step, dense vs Gaze Attention, for a recipe's shapes.

Reads only the recipe's `model:` (and `data.max_frames`) section: nothing is built or downloaded. The
LLM's head counts come from `--llm-config CONFIG.json`, else the recipe's `llm.config`, else a local
`llm.pretrained` directory's config.json, else a table of known hub checkpoints (gazelit.analysis.cost).
`--paper` prints the paper's section 3.5 example (8 frames x 576 tokens, 6x6 regions, M=4, k = 4/8/16).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cost", help="attended KV entries, FLOPs and bytes per decoding step: dense vs gaze",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", nargs="?", metavar="RECIPE", help="a recipe YAML (optional with --paper)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--k", type=_k, nargs="+", default=None, metavar="K",
                        help="regions per query head to compare (default: the recipe's model.gaze.top_k, "
                             "or 4 8 16 when it is 'all')")
    parser.add_argument("--text", type=int, default=64, help="text tokens in the cache, query included (64)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default: data.max_frames)")
    parser.add_argument("--grid", type=_grid, default=None, metavar="RxC",
                        help="vision encoder token grid, for checkpoints not known offline (e.g. 24x24)")
    parser.add_argument("--llm-config", default=None, metavar="CONFIG.json",
                        help="the LLM's config.json (head counts) when the recipe names a hub checkpoint")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per KV value (2: bf16/fp16)")
    parser.add_argument("--shared-gqa", action="store_true",
                        help="count with one region selection per KV head (default: the recipe's gaze.shared_gqa)")
    parser.add_argument("--no-count", action="store_true",
                        help="skip the FlopCounterMode cross-check on a real decode step")
    parser.add_argument("--paper", action="store_true", help="also print the paper's section 3.5 example")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the numbers as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gazelit.analysis import cost

    if args.recipe is None and not args.paper:
        raise SystemExit("gazelit cost: give a RECIPE, or --paper for the paper's example")
    out: dict = {}
    if args.paper:
        print(cost.paper_summary())
        dims = cost.AttentionDims(*cost.KNOWN_LLMS["Qwen/Qwen3-4B"], name="Qwen/Qwen3-4B (Cambrian-4B)")
        inp = cost.paper_example(text=args.text)
        rows = cost.compare(dims, inp, args.k or [4, 8, 16], args.dtype_bytes, count=not args.no_count,
                            shared=args.shared_gqa)
        print(cost.format_table(dims, inp, rows, args.dtype_bytes) + "\n")
        out["paper"] = cost.CostReport(dims, [(inp, rows)]).to_dict()
    if args.recipe is not None:
        from gazelit.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.override)
        config = recipe.model
        dims = cost.llm_dims(config, args.llm_config)
        grid = cost.visual_grid(config, args.grid)
        ks = args.k or _recipe_ks(config.gaze.top_k)
        report = cost.CostReport(dims)
        for inp in cost.recipe_inputs(config, grid, args.frames or recipe.data.max_frames, args.text):
            rows = cost.compare(dims, inp, ks, args.dtype_bytes, count=not args.no_count,
                                shared=args.shared_gqa or config.gaze.shared_gqa)
            print(cost.format_table(dims, inp, rows, args.dtype_bytes) + "\n")
            report.tables.append((inp, rows))
        out["recipe"] = report.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def _recipe_ks(top_k) -> list[int | None]:
    from gazelit.schema import resolve_top_k

    k = resolve_top_k(top_k)
    return [4, 8, 16] if k is None else [k]


def _k(value: str) -> int | None:
    from gazelit.schema import resolve_top_k

    return resolve_top_k(value)


def _grid(value: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RxC, e.g. 24x24, got {value!r}") from None
    return rows, cols
