"""`gazelit generate`: answer a prompt about an image, a video or a folder of frames.

Prints the answer (for a model with look spans, each look on its own line after it, on stderr: its box
and the text inside it). With `--trace OUTDIR` (gaze-enabled models) it also writes OUTDIR/index.html, a
self-contained routing viewer (the answer's tokens; hover / click one to see the regions each head
selected for it over the image or frames, with the dense attention of the same query beside it), and
PNG stills of the same under OUTDIR/stills/ (`--tensorboard LOGDIR` logs them as image summaries).
"""

from __future__ import annotations

import argparse
import sys

from gazelit.cli.loading import add_model_arguments, model_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="answer a prompt about an image or video; --trace writes the routing viewer",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--image", help="an image file")
    media.add_argument("--video", help="a video file or gif (frames sampled at --fps, at most --max-frames)")
    media.add_argument("--frames", metavar="DIR", help="a folder of frame images, taken in name order")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--system", default="You are a helpful assistant.", help="system prompt ('' for none)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--max-frames", type=int, default=32)
    parser.add_argument("--trace", metavar="OUTDIR", help="write the routing viewer and PNG stills here")
    parser.add_argument("--stills", type=int, default=None, metavar="N", help="stills for the first N tokens (all)")
    parser.add_argument("--tensorboard", metavar="LOGDIR", help="with --trace: log the stills to TensorBoard")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gazelit.datamodules.inference import Prompt, PromptEncoder, load_frames_dir, load_image, load_video_frames

    if args.tensorboard and not args.trace:
        raise SystemExit("gazelit generate: --tensorboard needs --trace")
    images, frames = [], []
    if args.image:
        images = [load_image(args.image)]
    elif args.video:
        frames, _ = load_video_frames(args.video, fps=args.fps, max_frames=args.max_frames)
    elif args.frames:
        frames, _ = load_frames_dir(args.frames, fps=args.fps, max_frames=args.max_frames)
    prompt = Prompt(args.prompt, images=images, frames=frames, system=args.system or None)
    model = model_from_args(args)
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                    top_p=args.top_p)
    if not args.trace:
        import torch

        batch = PromptEncoder.from_model(model).batch([prompt])
        batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = model.generate_from_batch(batch, trace=False, **sampling)[0]
        print(out.text)
        _print_looks(out)
        return 0
    from gazelit.viewer.data import trace_generation
    from gazelit.viewer.page import write_page
    from gazelit.viewer.stills import log_to_tensorboard, write_stills

    out, data = trace_generation(model, prompt, **sampling)
    print(out.text)
    _print_looks(out)
    page = write_page(data.to_json(), args.trace)
    stills = write_stills(data, args.trace, max_tokens=args.stills)
    if args.tensorboard:
        log_to_tensorboard(stills, args.tensorboard)
    print(f"routing viewer: {page} ({len(stills)} stills in {page.parent / 'stills'})", file=sys.stderr)
    return 0


def _print_looks(out) -> None:
    for look in out.looks:
        box = ", ".join(f"{c:.3f}" for c in look.box)
        closed = "" if look.end is not None else " (never closed)"
        print(f"look: unit {look.unit}, box [{box}]{closed}: {look.text!r}", file=sys.stderr)
