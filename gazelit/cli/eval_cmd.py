"""`gazelit eval`: score a model on a benchmark read from a local JSONL / parquet file.

Greedy decoding, the Cambrian-1 prompt and scoring rule of the benchmark (gazelit.eval.scorers). Prints
one row (model, benchmark, attended visual KV entries per query, metrics); `--out` writes the metrics and
every prediction as JSON. Rows of several runs side by side: `python -m gazelit.eval.runner A.json B.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gazelit.cli.loading import add_model_arguments, model_from_args
from gazelit.eval.scorers import SCORERS, SOURCES, OCRBenchScorer, get_scorer


def register(subparsers) -> None:
    epilog = "benchmarks: columns read; where to get the files (as parquet; a directory or glob of shards works)\n"
    epilog += "\n".join(f"  {name:10s} {cols}\n  {'':10s} {where}" for name, (cols, where) in SOURCES.items())
    epilog += "\n\nthe demo's test split: --bench gqa --data data/demo/raw/test.jsonl --media-root data/demo/raw/media"
    parser = subparsers.add_parser(
        "eval", help="score a model on an image or video QA benchmark file",
        description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--bench", required=True, choices=sorted(SCORERS), help="benchmark (scoring rule)")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="benchmark file (.parquet, .jsonl, .json, .csv), a directory of them, or a glob")
    parser.add_argument("--images", default=None, metavar="PATH",
                        help="a table of images (id, image) that rows with an imageId take theirs from (GQA)")
    parser.add_argument("--media-root", default=None, help="folder image/video paths are relative to "
                                                            "(default: the data file's folder)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's (32)")
    parser.add_argument("--fps", type=float, default=1.0, help="video frames sampled per second")
    parser.add_argument("--max-frames", type=int, default=32, help="at most this many frames per video")
    parser.add_argument("--exact", action="store_true", help="ocrbench: exact match instead of contains")
    parser.add_argument("--name", default=None, help="model name in the table (default: the path)")
    parser.add_argument("--out", default=None, metavar="results.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gazelit.eval.data import load_benchmark
    from gazelit.eval.runner import evaluate

    scorer = OCRBenchScorer(exact=args.exact) if args.bench == "ocrbench" else get_scorer(args.bench)
    try:
        samples = load_benchmark(args.data, args.media_root, args.limit, images=args.images)
        scorer.check_samples(samples, str(args.data))
    except (ValueError, FileNotFoundError) as e:
        print(f"gazelit eval: {e}", file=sys.stderr)
        return 2
    model = model_from_args(args)

    def progress(done: int, total: int) -> None:
        print(f"\r{args.bench}: {done}/{total}", end="", file=sys.stderr, flush=True)

    result = evaluate(model, scorer, samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      fps=args.fps, max_frames=args.max_frames, model_name=args.name or str(args.model),
                      progress=progress)
    print(file=sys.stderr)
    print(result.row())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return 0
