"""Gaze Attention vs dense attention: decode step and training forward+backward, side by side.

    python benchmarks/attention.py --json benchmarks/results/attention-cpu.json [--quick] [--device cuda]

Shapes (the issue's): 32 query / 8 KV heads, head dim 128, frames of 24x24 = 576 visual tokens in 6x6
regions (16 per frame), 4 context tokens per frame, 256 text tokens; 4,608 / 18,432 / 36,864 visual tokens
(8 / 32 / 64 frames); k in {all, 16, 8, 4}. Training also has the "one image + 512 text tokens" case.

dense = torch SDPA over the whole cache (is_causal for training). `dense_matmul_ms` is a second, stronger
CPU decode baseline (grouped matmul + softmax, no KV head expansion), reported so ratios are honest.
gaze decode = what generate() runs on a prebuilt per-layer state (descriptors and compact non-visual K/V
are built once per layer, like the KV cache itself): the fused Triton kernels on CUDA (batch 1 and 8, dense
= SDPA with the flash backend), gazelit.attention.decode_attention on CPU; routing_ms is its scoring + top-k
alone. union_fraction: the bytes a step must read over dense's; targets: gaze / dense <= 1.5 x union (GPU),
gaze / dense_matmul <= 2.5 x union (CPU).
gaze training = the segmented path on CPU, FlexAttention (compiled) on CUDA, routing included.
Every ratio is gaze / dense measured in the same process, interleaved, median of repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from gazelit.attention import (
    GazeLayout,
    RegionShape,
    Unit,
    build_state,
    decode_attention,
    flex_gaze_attention,
    region_scores,
    segmented_attention,
    select_regions,
)

HQ, HKV, D = 32, 8, 128
GRID, M, TEXT = (24, 24), 4, 256
REGION = RegionShape(6, 6, 1)


def video_layout(frames: int, text_before: int, text_after: int, batch: int = 1) -> GazeLayout:
    units, pos = [], text_before
    for t in range(frames):
        units.append(Unit(pos, GRID, video=0, time=t))
        pos += GRID[0] * GRID[1] + M
    return GazeLayout.build([units] * batch, pos + text_after, M, REGION)


def timed(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1000)
    return out


def side_by_side(fns: dict, device: str, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each function, runs interleaved so machine noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name] += timed(fn, device, 1)
    return {name: statistics.median(v) for name, v in samples.items()}


def union_fraction(q, state, layout, k_top, shared, visual, nonvisual, kv_bytes) -> float:
    """Bytes a decode step must read over the bytes dense attention reads: per KV head, the K and V rows
    of the union of its query heads' selected regions plus the text and context rows, plus the region
    descriptors it scores (float32); dense reads every K and V row of every KV head."""
    avail = torch.ones(1, 1, 1, layout.num_regions, dtype=torch.bool, device=q.device)
    sel, _ = select_regions(region_scores(q[:1], state.descriptors[:1]), avail, k_top, HKV, shared=shared)
    sizes = (layout.region_tokens[0] >= 0).sum(-1)  # tokens per region
    group = HQ // HKV
    rows = 0
    for h in range(HKV):
        chosen = sel[0, h * group : (h + 1) * group].flatten()
        union = torch.unique(chosen[chosen >= 0])
        rows += int(sizes[union].sum()) + nonvisual
    read = rows * 2 * D * kv_bytes + HKV * layout.num_regions * D * 4
    return read / (HKV * (visual + nonvisual) * 2 * D * kv_bytes)


def decode_rows(frames_list, ks, device, dtype, repeats, batches=(1,)):
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for frames, batch in [(f, b) for f in frames_list for b in batches]:
        layout = video_layout(frames, 0, TEXT, batch).to(device)
        s = layout.length
        k = torch.randn(batch, HKV, s + 1, D, generator=g).to(device, dtype)
        v = torch.randn(batch, HKV, s + 1, D, generator=g).to(device, dtype)
        q = torch.randn(batch, HQ, 1, D, generator=g).to(device, dtype)
        kd, vd = k[:, :, : s + 1], v[:, :, : s + 1]
        state = build_state(k, v, layout, s)
        qg = q.view(batch, HKV, HQ // HKV, D)

        def dense():
            with dense_backend(device):
                F.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)

        def dense_matmul():
            w = (qg @ kd.transpose(-1, -2)) * D**-0.5
            w.softmax(-1) @ vd

        visual = frames * GRID[0] * GRID[1]
        nonvisual = frames * M + TEXT + 1
        for k_top in ks:
            for shared in ([False] if k_top is None else [False, True]):
                gaze, route = gaze_step(q, k, v, layout, state, k_top, s, shared, device)
                t = side_by_side(
                    {"dense": dense, "dense_matmul": dense_matmul, "gaze": gaze, "routing": route}, device, repeats
                )
                attended_visual = visual if k_top is None else min(k_top, layout.num_regions) * REGION.tokens
                fraction = (attended_visual + nonvisual) / (visual + nonvisual)
                union = union_fraction(q, state, layout, k_top, shared, visual, nonvisual, k.element_size())
                rows.append(
                    dict(
                        batch=batch,
                        visual_tokens=visual,
                        text_tokens=TEXT,
                        k="all" if k_top is None else k_top,
                        gqa="shared" if shared else "per_head",
                        path="triton" if device == "cuda" and k_top is not None else "torch",
                        attended_fraction=round(fraction, 4),
                        dense_ms=round(t["dense"], 3),
                        dense_matmul_ms=round(t["dense_matmul"], 3),
                        gaze_ms=round(t["gaze"], 3),
                        ratio=round(t["gaze"] / t["dense"], 4),
                        ratio_vs_matmul=round(t["gaze"] / t["dense_matmul"], 4),
                        routing_ms=round(t["routing"], 3),
                        routing_share=round(t["routing"] / t["gaze"], 4),
                        target_ratio=round(1.5 * fraction, 4),
                        union_fraction=round(union, 4),
                        target_vs_union=round(1.5 * union, 4),  # GPU target: gaze / flash SDPA <= 1.5 x union
                        target_vs_matmul=round(2.5 * union, 4),  # CPU target: gaze / matmul <= 2.5 x union
                    )
                )
                print_row("decode", rows[-1])
    return rows


def dense_backend(device: str):
    """The dense decode baseline on CUDA is SDPA with the flash backend; on CPU, SDPA as torch picks it."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def gaze_step(q, k, v, layout, state, k_top, s, shared, device):
    """(a decode step as generate() runs it, its routing alone): the fused Triton kernels on CUDA, the torch
    path on CPU."""
    if device == "cuda" and k_top is not None:
        from gazelit.attention.triton_decode import fused_decode_attention, fused_route

        tables = state.tables(layout)
        q3 = q[:, :, 0]
        kk = min(k_top, layout.num_regions)
        return (lambda: fused_decode_attention(q, k, v, layout, state, k_top, s, shared=shared),
                lambda: fused_route(q3, state, tables, s, kk, HQ // HKV, shared))  # fmt: skip
    avail = torch.ones(1, 1, 1, layout.num_regions, dtype=torch.bool, device=device)
    return (lambda: decode_attention(q, k, v, layout, state, k_top, s, shared=shared),
            lambda: select_regions(region_scores(q, state.descriptors), avail, k_top, HKV, shared=shared))  # fmt: skip


def prefill_rows(cases, ks, device, dtype, repeats):
    rows = []
    g = torch.Generator(device="cpu").manual_seed(1)
    for name, layout in cases:
        layout = layout.to(device)
        s = layout.length
        q = torch.randn(1, HQ, s, D, generator=g).to(device, dtype).requires_grad_()
        k = torch.randn(1, HKV, s, D, generator=g).to(device, dtype).requires_grad_()
        v = torch.randn(1, HKV, s, D, generator=g).to(device, dtype).requires_grad_()
        grad = torch.randn(1, HQ, s, D, generator=g).to(device, dtype)

        def dense():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad)

        visual = int((layout.kind == 1).sum())
        text = int((layout.kind == 0).sum())
        for k_top in ks:
            if k_top is not None and k_top >= layout.num_regions:
                continue  # identical to k = all for this layout

            def gaze(k_top=k_top):
                if device == "cuda":
                    out = flex_gaze_attention(q, k, v, layout, k_top)
                else:
                    out = segmented_attention(q, k, v, layout, k_top)
                out.backward(grad)

            # short cases get more repeats: a 0.4 s measurement is easily moved by a noisy neighbour
            case_repeats = repeats * 3 if s < 2048 else repeats
            t = side_by_side({"dense": dense, "gaze": gaze}, device, case_repeats, warmup=1)
            rows.append(
                dict(
                    case=name,
                    visual_tokens=visual,
                    text_tokens=text,
                    k="all" if k_top is None else k_top,
                    dense_ms=round(t["dense"], 1),
                    gaze_ms=round(t["gaze"], 1),
                    repeats=case_repeats,
                    ratio=round(t["gaze"] / t["dense"], 4),
                )
            )
            print_row("prefill", rows[-1])
    return rows


def print_row(kind: str, row: dict) -> None:
    print(kind, " ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="a run under a minute: fewer sizes and repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument(
        "--prefill-frames", default=None,
        help="comma-separated frame counts for training rows (CPU default 8: 18k+ tokens take minutes per run)",
    )
    args = parser.parse_args(argv)
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    ks = [None, 16, 8, 4]
    if args.quick:
        decode_frames, repeats, prefill_frames = [8, 32], 5, []
    else:
        decode_frames, repeats = [8, 32, 64], 15
        prefill_frames = [8] if device == "cpu" else [8, 32, 64]
    if args.prefill_frames is not None:
        prefill_frames = [int(x) for x in args.prefill_frames.split(",") if x]

    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()}", flush=True)
    decode = decode_rows(decode_frames, ks, device, dtype, repeats, (1, 8) if device == "cuda" else (1,))
    one_image = GazeLayout.build([[Unit(16, GRID)]], 16 + 576 + M + 496, M, REGION)  # 512 text tokens
    cases = [("one image + 512 text", one_image)]
    cases += [(f"{f} frames + 256 text", video_layout(f, 0, TEXT)) for f in prefill_frames]
    prefill = prefill_rows(cases, [None, 4] if args.quick else ks, device, dtype, 3 if args.quick else 5)

    result = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if device == "cuda" else f"CPU: {platform.processor() or platform.machine()}",
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        python=sys.version.split()[0],
        dtype=str(dtype).replace("torch.", ""),
        shapes=dict(query_heads=HQ, kv_heads=HKV, head_dim=D, region="6x6", context_tokens=M),
        decode=decode,
        prefill=prefill,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print()
    print(table(decode, ["batch", "visual_tokens", "k", "gqa", "path", "attended_fraction", "dense_ms",
                         "dense_matmul_ms", "gaze_ms", "ratio", "union_fraction", "target_vs_union", "ratio_vs_matmul",
                         "target_vs_matmul", "routing_share"]))
    print()
    print(table(prefill, ["case", "visual_tokens", "text_tokens", "k", "dense_ms", "gaze_ms", "ratio"]))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
