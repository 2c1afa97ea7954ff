"""Does gaze keep quality while attending to a fraction of the visual entries? Dense vs gaze, measured.

    python benchmarks/fidelity.py --json benchmarks/results/fidelity-cpu.json [--steps 800] [--arms dense,gaze-25]

Trains the same tiny model on the same generated localized-VQA data (recipes/fidelity.yaml: "What shape
is the <colour> object?", three questions per training image, 4x4 board, 8x8 visual tokens in 2x2
regions = 16 regions) for the same steps with the same seed, once per arm, through `gazelit fit`:

    dense        the LLM's own attention, no context tokens: 64 visual entries per query
    gaze-25      k = 4 of 16 regions + 2 context tokens: 16 + 2 entries (25% of the visual tokens)
    gaze-12.5    k = 2: 8 + 2 entries (12.5%)
    no-context   gaze-12.5 without context tokens (ablation)
    no-schedule  gaze-12.5 sparse from step 0, no progressive schedule (ablation)
    local-25     gaze-25 on the patch embedding's features (no vision-tower layer: no token sees the board)
    local-12.5   the same at k = 2
    local-dense  the dense baseline on the same patch-embedding features
    look-12.5    gaze-12.5 with look spans (GazeVLM, supervised): every answer starts with
                 <look> box "colour shape" </look> for each object it names (the data's boxes)
    look-dense   the dense baseline with the same look spans
    look-grpo-12.5  look-12.5's exported model (trained first, same seed) trained 200 more steps by
                 GRPO (train.stage: grpo): 4 samples per prompt, rewards for well-formed looks, box
                 IoU and the exact answer, 2 clipped steps per batch of samples, KL 0.04 to look-12.5

then generates answers (greedy) for the held-back test split and reports, per arm:
    accuracy        exact match of the generated answer
    attended        visual entries attended per text query (selected region tokens + context tokens),
                    measured from the routing trace of the first answer token
    hit_rate        how often a head's selected regions contain the object the question asks about
                    (mean over test images, layers and heads, first answer token); chance is k / 16;
                    also per layer, per layer for "any head", and split by right / wrong answers
    routing_acc     the share of the selected visual tokens inside the object's region (first answer
                    token), with hit_rate_mean, hit_rate_best_head (the best layer x head) and the chances
    question_gap    per head, the hit rate on the named object minus the hit rate on the board's other
                    objects (the same questions): a head that selects every object whatever is asked has
                    gap 0. question_gap_best / _mean, and hit_rate_other_best_head (the best head's hits
                    on the other objects: against hit_rate_best_head, is it following the question?),
                    and question_gap_best_by_layer
    at_name         the same routing measures (a teacher-forced pass with gazelit's RoutingAccuracy probe)
                    at the query of the question's last word naming the object ("What shape is the red
                    object?": at "red"). A causal LM can look the object up there and carry what it saw
                    to the answer, and in the first layer the answer token's query cannot depend on the
                    question at all
`--eval-k 0,all` also runs every trained gaze arm at other k (k = 0: the text sees the context tokens and
no visual token); `--eval-selection static` also runs it with the first answer token's regions kept for
the whole answer. `accuracy_multi` is the accuracy on questions that name several objects (demo task
shapes_of_two). On two-object questions `second_object_hit_rate` is the hit
rate at the token that names the second object. Look arms also report look_well_formed (answers whose
generated looks are all well formed and closed, at least one), look_iou (each generated look's box
against the box of the object it should name, in order; a missing look scores 0) and
routing_acc_in_spans (the share of each look box's area inside that object); their routing metrics are
taken at the first answer token after the looks.
Writes JSON and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "fidelity.yaml"
ARMS = {
    "dense": ["model.gaze.enabled=false"],
    "gaze-25": ["model.gaze.top_k=4"],
    "gaze-12.5": ["model.gaze.top_k=2"],
    "no-context": ["model.gaze.top_k=2", "model.gaze.num_context=0"],
    "no-schedule": ["model.gaze.top_k=2", "schedule.start_step=0", "schedule.span_steps=0"],
    "static-12.5": ["model.gaze.top_k=2", "model.gaze.selection=static"],  # regions chosen once per answer
    # diagnosis: visual tokens from the patch embedding only (no vision-tower layer mixes the board)
    "local-25": ["model.gaze.top_k=4", "model.vision.feature_layer=0"],
    "local-12.5": ["model.gaze.top_k=2", "model.vision.feature_layer=0"],
    "local-dense": ["model.gaze.enabled=false", "model.vision.feature_layer=0"],
    # GazeVLM look spans, supervised with the data's boxes
    "look-12.5": ["model.gaze.top_k=2", "model.look.enabled=true"],
    "look-dense": ["model.gaze.enabled=false", "model.look.enabled=true"],
    "look-grpo-12.5": ["model.gaze.top_k=2", "model.look.enabled=true", "train.stage=grpo",
                       "init_from=runs/fidelity/look-12.5{suffix}/model", "trainer.max_steps=200",
                       "trainer.val_check_interval=100", "checkpoint.every_n_steps=100", "data.batch_size=4",
                       "schedule.start_step=0", "schedule.span_steps=0", "train.optim.warmup_steps=0",
                       "train.optim.schedule=constant", "train.optim.lr_projector=1e-4", "train.optim.lr_llm=1e-4",
                       "train.optim.lr_vision=1e-4", "train.grpo.group=4", "train.grpo.max_new_tokens=16",
                       "train.grpo.iterations=2", "train.grpo.kl=0.04", "logging.routing_image_every_n_steps=0"],
}


def train(arm: str, overrides: list[str], reuse: bool, suffix: str = "") -> tuple[Path, float, object]:
    from gazelit.recipe import load_recipe
    from gazelit.training import fit

    recipe = load_recipe(RECIPE, [*overrides, f"run.name={arm}{suffix}"])
    model_dir = recipe.run_dir / "model"
    if reuse and (model_dir / "gazelit_config.json").is_file():
        return model_dir, float("nan"), recipe
    shutil.rmtree(recipe.run_dir, ignore_errors=True)
    started = time.perf_counter()
    result = fit(recipe)
    return result.exported_model, time.perf_counter() - started, recipe


def target_tile(box: list[float], grid: tuple[int, int], region: tuple[int, int, int]) -> int:
    """Tile (row-major over the unit's regions) holding the centre of a normalised box."""
    (rows, cols), (rh, rw, _) = grid, region
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return int(cy * rows) // rh * -(-cols // rw) + int(cx * cols) // rw


@torch.no_grad()
def evaluate(model_dir: Path, recipe, batch_size: int = 32, k: object = "recipe", selection: str | None = None) -> dict:
    """Generate and score the test split. `k`: the recipe's target k (default), or another k to run the
    trained model at (an int, or None for every region): e.g. k = 0, where text sees no visual token
    at all, only the context tokens, says how much of the answer the context tokens carry. `selection`:
    run the model with dynamic or static selection (the model's own by default)."""
    from gazelit.schema import DataConfig, SourceConfig
    from gazelit.datamodules.datamodule import GazeDataModule
    from gazelit.attention.look import box_iou
    from gazelit.batch import answer_prompts
    from gazelit.models.gaze_vlm import GazeVLM
    from gazelit.models.routing_accuracy import RoutingAccuracy

    model = GazeVLM.from_pretrained(model_dir).eval()
    # the recipe's target k, wherever the schedule stopped, unless another is asked for
    model.top_k = model.config.gaze.top_k if k == "recipe" else k
    if selection is not None:
        model.config.gaze.selection = selection
    test = Path(recipe.demo.out) / "shards" / "test"
    config = DataConfig(test_sources=[SourceConfig(str(test))], batch_size=batch_size, num_workers=0,
                        max_length=recipe.data.max_length, system_prompt=recipe.data.system_prompt)
    data = GazeDataModule(config, model.tokenizer, model.image_transform(), model.visual_grid, model.num_context)
    correct: dict[str, list[bool]] = defaultdict(list)
    hits, attended, layer_hits = [], [], defaultdict(list)
    head_hits, head_inside, routed = None, None, 0
    head_other, head_pairs, compared = None, None, 0  # per head: hits on another object / on the named one
    second_hits: list[float] = []
    multi: list[bool] = []  # answers to questions that name several objects
    hits_by_outcome: dict[bool, list[float]] = {True: [], False: []}
    any_head: dict[int, list[float]] = defaultdict(list)
    per_unit = model.visual_grid[0] * model.visual_grid[1]
    looks = model.look_tokens is not None
    look_formed, look_ious, look_inside = [], [], []
    probe = None
    if model.gaze_enabled and model.top_k:
        close = model.look_tokens.close if looks else None
        probe = RoutingAccuracy(model.top_k, model.config.gaze.shared_gqa, look_close=close, tokenizer=model.tokenizer)
    for batch in data.test_dataloader():
        if probe is not None:  # teacher-forced: routing at the question's words that name the object
            probe.batch = batch
            model(batch, probe=probe)
        outputs = model.generate_from_batch(answer_prompts(batch, model.tokenizer.pad_token_id),
                                            max_new_tokens=24 if looks else 6)  # fmt: skip
        for meta, out in zip(batch["meta"], outputs):
            right = out.text.strip() == meta["answer"]
            correct[meta["task"]].append(right)
            if len(meta.get("target_boxes") or []) > 1:
                multi.append(right)
            if looks:
                wanted = meta.get("target_boxes") or [meta["target_box"]]
                look_formed.append(bool(out.looks) and out.looks_opened == len(out.looks)
                                   and all(look.end is not None for look in out.looks))  # fmt: skip
                for i, box in enumerate(wanted):
                    got = out.looks[i].box if i < len(out.looks) else None
                    look_ious.append(box_iou(got, box) if got else 0.0)
                    if got:
                        look_inside.append(box_iou_inside(got, box))
            if out.trace is None:
                attended.append(per_unit)
                continue
            trace = out.trace
            tile = target_tile(meta["target_box"], trace.unit_grids[0], trace.region_shape)
            boxes = meta.get("target_boxes") or []
            step = second_object_step(trace.tokens)
            if len(boxes) == 2 and step is not None and step < trace.tile.shape[0]:
                # the token that names the second object: does the gaze move there?
                second = target_tile(boxes[1], trace.unit_grids[0], trace.region_shape)
                second_hits.append((trace.tile[step] == second).any(-1).float().mean().item())
            first = max((look.end + 1 for look in out.looks if look.end is not None), default=0)
            if first >= trace.tile.shape[0]:
                continue
            chosen = trace.tile[first]  # first answer token: (layers, heads, k)
            hit = (chosen == tile).any(-1).float()  # (layers, heads)
            hits.append(hit.mean().item())
            rh0, rw0, _ = trace.region_shape
            sizes0 = torch.tensor([_tile_size(t, trace.unit_grids[0], (rh0, rw0)) for t in range(_tiles(trace))])
            selected = torch.where(chosen >= 0, sizes0[chosen.clamp(min=0)], 0).sum(-1).clamp(min=1)
            inside = torch.where(chosen == tile, sizes0[tile], 0).sum(-1) / selected  # (layers, heads)
            head_hits = hit if head_hits is None else head_hits + hit
            others = [target_tile(b, trace.unit_grids[0], trace.region_shape) for b in meta.get("other_boxes") or []]
            others = [t for t in others if t != tile]
            if others:  # the same heads' hit rate on the board's other objects: finding objects, not the one asked
                other = torch.stack([(chosen == t).any(-1).float() for t in others]).mean(0)
                head_other = other if head_other is None else head_other + other
                head_pairs = hit if head_pairs is None else head_pairs + hit
                compared += 1
            head_inside = inside.float() if head_inside is None else head_inside + inside.float()
            routed += 1
            hits_by_outcome[right].append(hit.mean().item())
            for layer in range(hit.shape[0]):
                layer_hits[layer].append(hit[layer].mean().item())
                any_head[layer].append(hit[layer].max().item())
            rh, rw, _ = trace.region_shape
            sizes = torch.tensor([_tile_size(t, trace.unit_grids[0], (rh, rw)) for t in range(_tiles(trace))])
            picked = torch.where(chosen >= 0, sizes[chosen.clamp(min=0)], 0).sum(-1).float()
            attended.append(picked.mean().item() + model.num_context)
    total = [c for v in correct.values() for c in v]
    k = model.top_k
    tiles = -(-model.visual_grid[0] // model.config.gaze.region[0]) * -(-model.visual_grid[1] // model.config.gaze.region[1])
    accuracy = sum(total) / len(total)

    def mean(values):
        return round(sum(values) / len(values), 4) if values else None

    return dict(
        accuracy=round(accuracy, 4),
        accuracy_stderr=round((accuracy * (1 - accuracy) / len(total)) ** 0.5, 4),
        n=len(total),
        per_task={t: round(sum(v) / len(v), 4) for t, v in correct.items()},
        accuracy_multi=mean(multi),  # questions naming several objects (None: there are none)
        multi_questions=len(multi),
        attended_entries=round(sum(attended) / len(attended), 2),
        visual_tokens=per_unit,
        k="all" if not model.gaze_enabled or k is None else k,
        context_tokens=model.num_context,
        hit_rate=round(sum(hits) / len(hits), 4) if hits else None,
        hit_rate_by_layer=[round(sum(v) / len(v), 4) for _, v in sorted(layer_hits.items())] or None,
        hit_rate_chance=round(min(k, tiles) / tiles, 4) if hits and k else None,
        any_head_hit_rate_by_layer=[mean(v) for _, v in sorted(any_head.items())] or None,
        hit_rate_correct_answers=mean(hits_by_outcome[True]),
        hit_rate_wrong_answers=mean(hits_by_outcome[False]),
        routing_acc=round(float(head_inside.mean()) / routed, 4) if routed and k else None,
        # random regions: the object's region holds region tokens / visual tokens of what is selected
        routing_acc_chance=round(model.config.gaze.region[0] * model.config.gaze.region[1] / per_unit, 4)
        if routed else None,
        hit_rate_mean=round(float(head_hits.mean()) / routed, 4) if routed else None,
        hit_rate_best_head=round(float(head_hits.max()) / routed, 4) if routed else None,
        **question_following(head_pairs, head_other, compared),
        selection=model.config.gaze.selection,
        # two-object answers: at the token naming the second object, heads whose regions hold it
        second_object_hit_rate=mean(second_hits),
        second_object_answers=len(second_hits),
        look_well_formed=mean(look_formed),
        look_iou=mean(look_ious),
        routing_acc_in_spans=mean(look_inside),
        at_name=at_name_summary(probe.metrics() if probe is not None else {}),
    )


def at_name_summary(metrics: dict) -> dict | None:
    """The probe's routing at the question's words naming the object, rounded; None where not measured."""
    named = {k.removeprefix("at_name/"): v for k, v in metrics.items() if k.startswith("at_name/")}
    if not named:
        return None
    keys = ("routing_acc", "routing_acc_chance", "hit_rate_mean", "hit_rate_best_head", "hit_rate_chance",
            "hit_rate_other_best_head", "question_gap_best", "question_gap_mean", "samples")  # fmt: skip
    out = {k: round(named[k], 4) for k in keys if k in named}
    layers = sorted(int(k.split("layer")[1]) for k in named if k.startswith("question_gap/layer"))
    out["question_gap_best_by_layer"] = [round(named[f"question_gap/layer{i}"], 4) for i in layers] or None
    out["phrase_not_found"] = int(named.get("phrase_not_found", 0))
    return out


def question_following(named, other, n: int) -> dict:
    """Does routing follow the question or only find objects? Per head, the hit rate on the named object
    against the hit rate on the board's other objects (same questions): the best head's other-object hit
    rate, and the largest and mean gap. A head that selects every object, whatever is asked, has gap 0."""
    if not n:
        return dict(hit_rate_other_best_head=None, hit_rate_other_mean=None, question_gap_best=None,
                    question_gap_mean=None, question_gap_questions=0, question_gap_best_by_layer=None)  # fmt: skip
    named, other = named / n, other / n
    best = int(named.flatten().argmax())
    gap = named - other
    return dict(
        hit_rate_other_best_head=round(float(other.flatten()[best]), 4),
        hit_rate_other_mean=round(float(other.mean()), 4),
        question_gap_best=round(float(gap.max()), 4),  # the head whose selection follows the question most
        question_gap_mean=round(float(gap.mean()), 4),
        question_gap_questions=n,
        # per layer, its best head's gap. Layer 0 cannot follow the question: its query at the first
        # answer token is computed from that one prompt token, the same for every question.
        question_gap_best_by_layer=[round(float(g), 4) for g in gap.max(dim=-1).values],
    )


def box_iou_inside(look: tuple[float, ...], target: list[float]) -> float:
    """The share of a look box's area inside the target box."""
    w = max(0.0, min(look[2], target[2]) - max(look[0], target[0]))
    h = max(0.0, min(look[3], target[3]) - max(look[1], target[1]))
    area = (look[2] - look[0]) * (look[3] - look[1])
    return w * h / area if area > 0 else 0.0


def second_object_step(tokens: list[str]) -> int | None:
    """Index of the generated token that starts the second object's name in "<shape> and <shape>"."""
    text = ""
    for index, token in enumerate(tokens):
        if re.search(r"\band$", text.strip()):
            return index
        text += token
    return None


def _tiles(trace) -> int:
    rows, cols = trace.unit_grids[0]
    rh, rw, _ = trace.region_shape
    return -(-rows // rh) * -(-cols // rw)


def _tile_size(tile: int, grid: tuple[int, int], region: tuple[int, int]) -> int:
    rows, cols = grid
    rh, rw = region
    per_row = -(-cols // rw)
    r, c = divmod(tile, per_row)
    return (min((r + 1) * rh, rows) - r * rh) * (min((c + 1) * rw, cols) - c * rw)


def table(rows: list[dict]) -> str:
    head = ("| arm | accuracy (± s.e.) | attended visual entries / query | routing hit rate (chance) "
            "| hit rate: right / wrong answers | best head: named / other object "
            "| at the question's naming word: best head named / other | second object hit rate | train time |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["eval"]
        chance = "" if e["hit_rate_chance"] is None else f" ({e['hit_rate_chance']:.3f})"
        hit = "-" if e["hit_rate"] is None else f"{e['hit_rate']:.3f}{chance}"
        entries = f"{e['attended_entries']:.1f} of {e['visual_tokens']}" + (
            f" (k={e['k']}, M={e['context_tokens']})" if r["arm"] != "dense" else ""
        )
        split = "-" if e["hit_rate"] is None else f"{e['hit_rate_correct_answers']:.3f} / {e['hit_rate_wrong_answers']:.3f}"
        seconds = "-" if r["train_seconds"] != r["train_seconds"] else f"{r['train_seconds']:.0f} s"  # NaN: reused / re-evaluated
        second = "-" if e.get("second_object_hit_rate") is None else f"{e['second_object_hit_rate']:.3f}"
        other = ("-" if e.get("hit_rate_other_best_head") is None
                 else f"{e['hit_rate_best_head']:.2f} / {e['hit_rate_other_best_head']:.2f}")  # fmt: skip
        named = e.get("at_name") or {}
        at_name = ("-" if named.get("hit_rate_other_best_head") is None
                   else f"{named['hit_rate_best_head']:.2f} / {named['hit_rate_other_best_head']:.2f}")  # fmt: skip
        lines.append(f"| {r['arm']} | {e['accuracy']:.3f} ± {e['accuracy_stderr']:.3f} | {entries} | {hit} | {split} "
                     f"| {other} | {at_name} | {second} | {seconds} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    parser.add_argument("--steps", type=int, default=None, help="override trainer.max_steps for every arm")
    parser.add_argument("--reuse", action="store_true", help="evaluate existing runs/fidelity/<arm>/model")
    parser.add_argument("--override", action="append", default=[], help="extra recipe key=value for all arms")
    parser.add_argument("--seed", type=int, default=None, help="recipe seed (run names get a -seedN suffix)")
    parser.add_argument("--eval-selection", default="", help="also evaluate every gaze arm with this selection "
                        "(static: the first answer token's regions kept for the whole answer)")  # fmt: skip
    parser.add_argument("--eval-k", default="", help="also evaluate every gaze arm at these k (comma-separated, "
                        "'all' for every region; 0: context tokens only), e.g. 0,1,all")  # fmt: skip
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the recipe's relative paths (data/, runs/) are relative to the repository
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    common = list(args.override) + ([f"trainer.max_steps={args.steps}"] if args.steps else [])
    if args.seed is not None:
        common.append(f"seed={args.seed}")
    previous = {}  # with --reuse, keep the training times measured when the models were trained
    if args.reuse and Path(args.json).is_file():
        previous = {r["arm"]: r for r in json.loads(Path(args.json).read_text())["arms"]}
    rows = []
    for arm in arms:
        print(f"== {arm}: training", flush=True)
        suffix = f"-seed{args.seed}" if args.seed is not None else ""
        # an arm's own keys come last and win (look-grpo-12.5's 100 steps over --steps)
        arm_overrides = common + [o.replace("{suffix}", suffix) for o in ARMS[arm]]
        model_dir, seconds, recipe = train(arm, arm_overrides, args.reuse, suffix)
        if seconds != seconds and arm in previous:  # reused: NaN
            seconds = previous[arm]["train_seconds"]
        print(f"== {arm}: evaluating {model_dir}", flush=True)
        rows.append(dict(arm=arm, overrides=arm_overrides, train_seconds=round(seconds, 1),
                         eval=evaluate(model_dir, recipe)))
        print(json.dumps(rows[-1]), flush=True)
        gaze = recipe.model.gaze.enabled  # dense arms have no selection or k to vary
        if gaze and args.eval_selection:
            rows.append(dict(arm=f"{arm} @ {args.eval_selection}", overrides=arm_overrides,
                             train_seconds=float("nan"), eval=evaluate(model_dir, recipe, selection=args.eval_selection)))
            print(json.dumps(rows[-1]), flush=True)
        if gaze:
            for value in [v for v in args.eval_k.split(",") if v]:
                k = None if value == "all" else int(value)
                rows.append(dict(arm=f"{arm} @ k={value}", overrides=arm_overrides,
                                 train_seconds=float("nan"), eval=evaluate(model_dir, recipe, k=k)))  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    result = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
        python=sys.version.split()[0],
        recipe=str(RECIPE.relative_to(ROOT)),
        steps=recipe.trainer.max_steps,
        seed=recipe.seed,
        arms=rows,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print()
    print(table(rows))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
