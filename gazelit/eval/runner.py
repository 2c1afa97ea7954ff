"""Run a GazeVLM over a benchmark: greedy generation in left-padded batches, per-sample scores, metrics,
and the attended visual KV entries per query next to the score (the paper's "KV size" column).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gazelit.analysis.cost import kv_label
from gazelit.eval.data import BenchSample
from gazelit.eval.scorers import Scorer

from gazelit.datamodules.inference import Prompt, PromptEncoder, load_video_frames


@dataclass
class EvalResult:
    bench: str
    model: str
    kv_size: str  # attended visual KV entries per query: "144+4" (gaze), "576" (dense)
    top_k: Any
    metrics: dict[str, float]
    count: int
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self) -> str:
        return format_table([self.to_dict()])


def evaluate(
    model: Any,
    scorer: Scorer,
    samples: Sequence[BenchSample],
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    fps: float = 1.0,
    max_frames: int = 32,
    model_name: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Greedy answers for every sample, scored by `scorer` (which first refuses rows without its medium)."""
    scorer.check_samples(list(samples))
    encoder = PromptEncoder.from_model(model)
    device = next(model.parameters()).device
    metric = scorer.metric()
    predictions: list[dict[str, Any]] = []
    units_seen: Counter = Counter()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        prompts = [_prompt(scorer, s, fps, max_frames) for s in chunk]
        units_seen.update(len(p.units) for p in prompts)
        batch = _to(encoder.batch(prompts), device)
        outputs = model.generate_from_batch(batch, max_new_tokens=max_new_tokens or scorer.max_new_tokens,
                                            do_sample=False, trace=False)
        scores = []
        for sample, out in zip(chunk, outputs):
            text = out.text.strip()
            scores.append(scorer.score(sample, text))
            predictions.append({"id": sample.id, "prediction": text, "answer": sample.answer, "score": scores[-1]})
        metric.update(scores, [scorer.category(s) for s in chunk], [scorer.group(s) for s in chunk])
        if progress:
            progress(min(start + batch_size, len(samples)), len(samples))
    units = units_seen.most_common(1)[0][0] if units_seen else 1
    label = kv_label(model.config, model.visual_grid, model.top_k, units=max(units, 1), video=scorer.video)
    return EvalResult(
        bench=scorer.name, model=model_name, kv_size=label, top_k="all" if model.top_k is None else model.top_k,
        metrics=scorer.summarize(metric.compute()), count=len(samples), predictions=predictions,
    )


def _prompt(scorer: Scorer, sample: BenchSample, fps: float, max_frames: int) -> Prompt:
    text = scorer.prompt(sample)
    if sample.video is not None:
        frames, _times = load_video_frames(sample.video, fps=fps, max_frames=max_frames)
        return Prompt(text, frames=frames)
    if scorer.video:
        raise ValueError(f"{scorer.name}: sample {sample.id} has no 'video'")
    image = sample.load_image()
    return Prompt(text, images=[image] if image is not None else [])


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def format_table(results: Sequence[dict[str, Any]], max_metrics: int = 4) -> str:
    """Rows of model | bench | KV size | the first metrics, so dense and gaze runs read side by side."""
    header = f"{'model':24} {'bench':10} {'KV size':>9} {'n':>5}  metrics"
    lines = [header]
    for r in results:
        shown = list(r["metrics"].items())[:max_metrics]
        metrics = "  ".join(f"{k} {v:.1f}" for k, v in shown)
        lines.append(f"{r['model'][:24]:24} {r['bench']:10} {r['kv_size']:>9} {r['count']:>5}  {metrics}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m gazelit.eval.runner A.json B.json ...`: the results of several runs side by side."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", nargs="+", help="results.json files written by `gazelit eval --out`")
    args = parser.parse_args(argv)
    print(format_table([json.loads(Path(p).read_text()) for p in args.results]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
