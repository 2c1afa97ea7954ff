"""The GPU acceptance run in one command (under 8 minutes on one H100 / H200, with the machine's own torch):

    python benchmarks/gpu_check.py                 # on the GPU machine: writes benchmarks/results/gpu-<device>-<date>.{json,md}
    python benchmarks/gpu_check.py --dry-run       # the same plumbing on CPU at tiny sizes (CI runs it)

Sections, each recorded as passed / failed / skipped with its figures (a failing section does not stop
the others; the exit status is 1 if any failed):

  tests      the GPU tests (compiled FlexAttention forward and backward against the reference in fp32 and
             bf16, decode, the backend) and the compile-once-per-bucket test, through pytest
  attention  decode step gaze vs dense (SDPA, flash backend on CUDA) at 18,432 and 36,864 visual tokens,
             batch 1 and 8, k = 4; training forward + backward, flex vs dense, 8 frames
  fit        30 steps of a ~0.5B Gaze VLM (Qwen3-style LLM, SigLIP2-style tower at 24x24 tokens) in bf16 on
             the flex path: tokens/s, peak memory, compilations, step-0 loss against the reference path
  generate   greedy tokens/s, gaze (k = 4) vs dense, 32 frames x 576 tokens, batch 8
  fsdp2      a 2-process FSDP2 step where the machine has 2 GPUs (skipped, saying so, elsewhere)

Nothing here downloads anything: models are built from configs with random weights. The lent GPU
machine lacks webdataset, omegaconf and decord: `bash scripts/gpu_wheels.sh` fetches their wheels into
.whl/ here, and the device command (carry .whl) is

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
      && python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL = {
    "decode_visual": [18_432, 36_864], "decode_batch": [1, 8], "frames_train": 8, "grid": 24, "heads": (32, 8),
    "head_dim": 128, "fit_steps": 30, "fit_batch": 4, "gen_frames": 32, "gen_batch": 8, "gen_tokens": 32,
    "llm": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                head_dim=128, intermediate_size=3072, vocab_size=32_000),
    "vision": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                   image_size=384, patch_size=16),
    "region": [6, 6], "top_k": 4, "dtype": "bfloat16",
}  # fmt: skip
DRY = {
    "decode_visual": [512], "decode_batch": [1], "frames_train": 2, "grid": 8, "heads": (4, 2),
    "head_dim": 16, "fit_steps": 3, "fit_batch": 2, "gen_frames": 2, "gen_batch": 2, "gen_tokens": 4,
    "llm": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=640),
    "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   image_size=32, patch_size=4),
    "region": [2, 2], "top_k": 2, "dtype": "float32",
}  # fmt: skip


def video_layout(cfg, frames: int, batch: int, text_before: int, text_after: int, device):
    """`batch` copies of: text, `frames` frames of grid x grid tokens with 4 context tokens each, text."""
    from gazelit.attention import GazeLayout, RegionShape, Unit

    grid, units, pos = cfg["grid"], [], text_before
    for f in range(frames):
        units.append(Unit(pos, (grid, grid), video=0, time=f))
        pos += grid * grid + 4
    return GazeLayout.build([units] * batch, pos + text_after, 4, RegionShape(*cfg["region"]), device=device)


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------- sections
def section_tests(cfg, device, dry) -> dict:
    # the fused decode kernels: compiled on CUDA; in the dry run a few cases through Triton's interpreter
    files = (["tests/attention/test_gpu.py", "tests/attention/test_flex_compile.py", "tests/attention/test_triton_decode.py",
              "tests/attention/test_look.py"]
             if not dry else ["tests/attention/test_fast_paths.py", "tests/attention/test_triton_decode.py",
                              "-k", "(test_fast_paths and decode) or ties or given"])  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=REPO,
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return {"ok": proc.returncode == 0, "summary": summary}


def section_attention(cfg, device, dry) -> dict:
    from gazelit.attention import build_state, decode_attention, flex_gaze_attention
    from gazelit.attention.segmented import segmented_attention

    dtype = getattr(torch, cfg["dtype"])
    hq, hkv = cfg["heads"]
    d, grid = cfg["head_dim"], cfg["grid"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for visual in cfg["decode_visual"]:
        frames = visual // (grid * grid)
        for batch in cfg["decode_batch"]:
            layout = video_layout(cfg, frames, batch, 8, 64, device)
            length = layout.length
            k = torch.randn(batch, hkv, length + 1, d, device=device, dtype=dtype)
            v = torch.randn_like(k)
            q = torch.randn(batch, hq, 1, d, device=device, dtype=dtype)
            state = build_state(k, v, layout, length)

            def dense():
                with _flash(device):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            decode = decode_attention
            if device.type == "cuda":  # what generate() runs there
                from gazelit.attention.triton_decode import fused_decode_attention as decode

            def gaze(decode=decode):
                decode(q, k, v, layout, state, cfg["top_k"], length)

            regions = layout.num_regions
            union = min(1.0, (cfg["top_k"] * hq // hkv) / max(regions, 1))  # per KV head, worst case
            t_dense, t_gaze = timed(dense, 5, sync), timed(gaze, 5, sync)
            rows.append({"visual_tokens": visual, "batch": batch, "k": cfg["top_k"], "dense_ms": 1e3 * t_dense,
                         "gaze_ms": 1e3 * t_gaze, "ratio": t_gaze / t_dense, "union_fraction_bound": union})  # fmt: skip
    # training forward + backward at one shape (flex on CUDA, segmented on CPU)
    frames = cfg["frames_train"]
    layout = video_layout(cfg, frames, 1, 4, 128, device)
    length = layout.length
    q = torch.randn(1, hq, length, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, hkv, length, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, hkv, length, d, device=device, dtype=dtype, requires_grad=True)
    path = flex_gaze_attention if device.type == "cuda" else segmented_attention

    def train_gaze():
        path(q, k, v, layout, cfg["top_k"]).sum().backward()

    def train_dense():
        with _flash(device):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

    t_dense, t_gaze = timed(train_dense, 3, sync), timed(train_gaze, 3, sync)
    train = {"tokens": length, "frames": frames, "k": cfg["top_k"], "dense_ms": 1e3 * t_dense,
             "gaze_ms": 1e3 * t_gaze, "ratio": t_gaze / t_dense, "path": path.__name__}  # fmt: skip
    return {"ok": True, "decode": rows, "train": train}


def _flash(device):
    from contextlib import nullcontext

    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def build_model(cfg, device, impl: str):
    from gazelit.models.gaze_vlm import GazeVLM
    from gazelit.models.tiny import TINY_LLM
    from gazelit.schema import GazeSpec, LLMSpec, ModelConfig, VisionSpec
    from gazelit.tokenizer import build_tiny_tokenizer

    llm = {**TINY_LLM["qwen3"], **cfg["llm"]}
    config = ModelConfig(
        vision=VisionSpec("siglip2", config=dict(cfg["vision"]), trainable=False),
        llm=LLMSpec(config=llm, dtype=cfg["dtype"]),
        gaze=GazeSpec(top_k=cfg["top_k"], region=list(cfg["region"]), num_context=4, impl=impl),
    )
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer(["what colour is the object in the picture"] * 4, vocab_size=512)
    return GazeVLM.build(config, tokenizer=tokenizer).to(device)


def section_fit(cfg, device, dry) -> dict:
    from tests.batches import make_batch

    from gazelit.attention.flex import compilations
    from gazelit.lit_module import GazeVLMModule
    from gazelit.schema import OptimConfig, TrainConfig

    import lightning as L

    impl = "flex" if device.type == "cuda" else "segmented"
    model = build_model(cfg, device, impl)
    samples = [[("text", 12), ("image",), ("text", 40)]] * cfg["fit_batch"]
    batches = [make_batch(model, samples, seed=i) for i in range(cfg["fit_steps"])]
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    with torch.no_grad():  # step-0 loss: this path against the reference path, same weights and batch
        loss_fast = float(model(batches[0]).loss)
        model.config.gaze.impl = "reference"
        loss_ref = float(model(batches[0]).loss)
        model.config.gaze.impl = impl
    lit = GazeVLMModule(model.config, TrainConfig(optim=OptimConfig(warmup_steps=0, schedule="constant")), model=model)
    start_compiles = compilations()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(max_steps=cfg["fit_steps"], accelerator=device.type, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        precision="bf16-true" if cfg["dtype"] == "bfloat16" else "32-true")  # fmt: skip
    begin = time.perf_counter()
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    elapsed = time.perf_counter() - begin
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    tol = 3e-2 if cfg["dtype"] == "bfloat16" else 1e-4
    return {
        "ok": abs(loss_fast - loss_ref) <= tol * max(1.0, abs(loss_ref)) and math.isfinite(float(trainer.callback_metrics["train/loss"])),
        "params": sum(p.numel() for p in model.parameters()), "steps": cfg["fit_steps"], "impl": impl,
        "tokens_per_s": tokens / elapsed, "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "compilations": compilations() - start_compiles, "step0_loss": loss_fast, "step0_loss_reference": loss_ref,
        "final_loss": float(trainer.callback_metrics["train/loss"]),
    }  # fmt: skip


def section_generate(cfg, device, dry) -> dict:
    from gazelit.attention import GazeContext, use_gaze

    model = build_model(cfg, device, "auto").eval()
    llm = model.llm
    frames, batch = cfg["gen_frames"], cfg["gen_batch"]
    layout = video_layout(cfg, frames, batch, 16, 32, device)
    length = layout.length
    dtype = next(llm.parameters()).dtype
    embeds = torch.randn(batch, length, llm.config.hidden_size, device=device, dtype=dtype) * 0.02
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    gen = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=cfg["gen_tokens"], do_sample=False,
               min_new_tokens=cfg["gen_tokens"], pad_token_id=0)  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_gaze():
        with torch.no_grad(), use_gaze(GazeContext(layout, top_k=cfg["top_k"])):
            llm.generate(**gen)

    def run_dense():
        with torch.no_grad(), use_gaze(GazeContext(layout, top_k=None)):  # k = all: every cached token
            llm.generate(**gen)

    t_gaze, t_dense = timed(run_gaze, 1, sync), timed(run_dense, 1, sync)
    new = batch * cfg["gen_tokens"]
    return {"ok": True, "prompt_tokens": length, "frames": frames, "batch": batch, "new_tokens": cfg["gen_tokens"],
            "gaze_tokens_per_s": new / t_gaze, "dense_tokens_per_s": new / t_dense, "speedup": t_dense / t_gaze}  # fmt: skip


def section_fsdp2(cfg, device, dry) -> dict:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        reason = "CPU dry run (the 2-rank gloo tests cover FSDP2)" if dry else f"{torch.cuda.device_count()} GPU(s)"
        return {"ok": True, "skipped": reason}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "tests/models/test_distributed_loss.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    return {"ok": proc.returncode == 0, "summary": proc.stdout.strip().splitlines()[-1:]}


SECTIONS = {"tests": section_tests, "attention": section_attention, "fit": section_fit,
            "generate": section_generate, "fsdp2": section_fsdp2}  # fmt: skip


# ---------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']} ({report['date']})", "",
             f"torch {report['versions']['torch']}, triton {report['versions'].get('triton')}, "
             f"transformers {report['versions'].get('transformers')}; dry run: {report['dry_run']}", "",
             "| section | status | figures |", "|---|---|---|"]  # fmt: skip
    for name, result in report["sections"].items():
        status = "skipped" if result.get("skipped") else ("passed" if result.get("ok") else "FAILED")
        figures = {k: v for k, v in result.items() if k not in ("ok", "decode", "error")}
        lines.append(f"| {name} | {status} | {json.dumps(figures, default=str)[:400]} |")
    decode = report["sections"].get("attention", {}).get("decode") or []
    if decode:
        lines += ["", "| visual tokens | batch | k | dense ms | gaze ms | gaze / dense |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['visual_tokens']} | {r['batch']} | {r['k']} | {r['dense_ms']:.3f} | {r['gaze_ms']:.3f} | "
                  f"{r['ratio']:.3f} |" for r in decode]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the same plumbing (CI)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu-<device>-<date>.json)")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run these sections only")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run to check the plumbing on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    cfg = DRY if args.dry_run else FULL
    name = "cpu-dry-run" if args.dry_run else torch.cuda.get_device_name(0).replace(" ", "-").lower()
    date = datetime.date.today().isoformat()
    report: dict[str, Any] = {"device": name, "date": date, "dry_run": args.dry_run, "host": platform.node(),
                              "versions": _versions(), "sections": {}}  # fmt: skip
    for section, fn in SECTIONS.items():
        if args.only and section not in args.only:
            continue
        start = time.perf_counter()
        try:
            result = fn(cfg, device, args.dry_run)
        except Exception as e:  # a failing section is reported; the others still run
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["sections"][section] = result
        print(f"gpu_check: {section}: {'ok' if result.get('ok') else 'FAILED'} ({result['seconds']} s)", flush=True)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"gpu-{name}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if all(r.get("ok") for r in report["sections"].values()) else 1


def _versions() -> dict[str, str | None]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "transformers", "lightning"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
