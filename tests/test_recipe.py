"""Recipes: extends, overrides, interpolation, and errors naming key, file and closest valid key."""

import textwrap
from pathlib import Path

import pytest

from gazelit.recipe import RecipeError, load_recipe, resolved_yaml

BASE = """
model:
  vision: {family: siglip2, config: {hidden_size: 32}}
  llm: {config: {model_type: qwen3}}
  gaze: {top_k: 4}
trainer: {max_steps: 100}
run: {name: base}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_extends_overrides_and_interpolation(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", """
        extends: base.yaml
        model: {gaze: {top_k: 2, region: [3, 3]}}
        run: {name: "k${model.gaze.top_k}"}
    """)
    recipe = load_recipe(child, ["model.gaze.top_k=8", "model.vision.family=clip"])
    assert recipe.model.gaze.top_k == 8 and recipe.model.gaze.region == [3, 3]
    assert recipe.run.name == "k8" and recipe.model.vision.family == "clip"
    assert recipe.trainer.max_steps == 100  # from the base
    assert "name: k8" in resolved_yaml(recipe)


@pytest.mark.parametrize(
    "child,overrides,message",
    [
        ("model: {vison: {family: clip}}", [], r"child.yaml: key 'model.vison'.*Did you mean: 'vision'"),
        ("trainer: {max_steps: many}", [], r"child.yaml: key 'trainer.max_steps'.*could not be converted to Integer"),
        ("", ["trainer.max_stepz=3"], r"command line: key 'trainer.max_stepz'.*Did you mean: 'max_steps'"),
        ("checkpont: {every_n_steps: 5}", [], r"child.yaml: key 'checkpont'.*(Did you mean: 'checkpoint'|closest valid key: checkpoint)"),
        ("model: {gaze: {top_k: most}}", [], r"top_k must be an integer or 'all'"),
        ("trainer: {strategy: {name: fsdp3}}", [], r"trainer.strategy.name must be one of"),
    ],
)
def test_bad_recipes_fail_before_anything_is_built(tmp_path, child, overrides, message):
    write(tmp_path, "base.yaml", BASE)
    path = write(tmp_path, "child.yaml", "extends: base.yaml\n" + child)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, overrides)


def test_missing_base_and_cycles_are_reported(tmp_path):
    a = write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(a)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(write(tmp_path, "c.yaml", "extends: nowhere.yaml\n"))


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.optim.lr_llm=-1e-4", "train.optim.lr_llm"),
        ("train.optim.lr_projector=0", "train.optim.lr_projector"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.devices=0", "trainer.devices"),
        ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps"),
        ("train.optim.warmup_steps=-1", "train.optim.warmup_steps"),
        ("data.max_skip_fraction=1.5", "data.max_skip_fraction"),
        ("data.max_skip_fraction=-0.1", "data.max_skip_fraction"),
        ("model.vision.family=vit", "model.vision.family"),
        ("model.projector.kind=linear", "model.projector.kind"),
        ("model.gaze.impl=fast", "model.gaze.impl"),
        ("model.llm.config.model_type=gpt9", "model.llm.config.model_type"),
        ("data.sources=[{path: /no/such/shards}]", "data.sources[0].path"),
        ("init_from=/no/such/checkpoint.ckpt", "init_from"),
        ("data.verify=sha", "data.verify"),
        ("data.damaged_shards=ignore", "data.damaged_shards"),
        ("data.length_buckets=[256,128]", "data.length_buckets"),
        ("model.gaze.selection=once", "model.gaze.selection"),
        ("model.gaze.decode=cuda", "model.gaze.decode"),
        ("model.look.bias=2.0", "model.look.bias"),
        ("model.look.bins=0", "model.look.bins"),
        ("train.stage=rl", "train.stage"),
        ("train.grpo.group=1", "train.grpo.group"),
        ("train.grpo.clip=0", "train.grpo.clip"),
    ],
)
def test_values_that_cannot_train_are_rejected_naming_the_key(tmp_path, override, key, capsys):
    from gazelit.cli import main

    base = write(tmp_path, "base.yaml", BASE)
    with pytest.raises(RecipeError) as error:
        load_recipe(base, [override], paths=True)
    assert key in str(error.value) and "\n" not in str(error.value)
    assert main(["validate", str(base), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0]


def test_component_names_match_the_registries():
    from gazelit.schema import GAZE_IMPLS, PROJECTOR_KINDS, VISION_FAMILY_NAMES
    from gazelit.models.projectors import PROJECTORS
    from gazelit.models.vision import VISION_FAMILIES
    from gazelit.attention.context import IMPLEMENTATIONS

    assert set(VISION_FAMILY_NAMES) == set(VISION_FAMILIES)
    assert set(PROJECTOR_KINDS) == set(PROJECTORS)
    assert set(GAZE_IMPLS) == set(IMPLEMENTATIONS)


def test_top_k_above_one_unit_is_a_warning(tmp_path, caplog):
    import logging

    base = write(tmp_path, "base.yaml", BASE)
    overrides = ["model.vision.config={hidden_size: 32, image_size: 64, patch_size: 16}", "model.gaze.region=[2,2]",
                 "model.gaze.top_k=9"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        recipe = load_recipe(base, overrides)
    assert recipe.model.gaze.top_k == 9
    assert "above the 4 regions of one unit" in caplog.text


def test_validate_offline_skips_the_path_check_and_fit_does_not(tmp_path, capsys):
    from gazelit.cli import main

    base = write(tmp_path, "base.yaml", BASE + "data: {sources: [{path: /cluster/only/shards}]}\n")
    assert main(["validate", "--offline", "--quiet", str(base)]) == 0
    assert main(["validate", "--quiet", str(base)]) == 2
    assert main(["fit", str(base)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "gazelit fit: data.sources[0].path: /cluster/only/shards does not exist"


@pytest.mark.parametrize("written,resolved", [("all", None), ("ALL", None), (4, 4), ("3", 3), (0, 0)])
def test_k_is_resolved_once_when_the_recipe_loads(tmp_path, written, resolved):
    base = write(tmp_path, "base.yaml", BASE)
    recipe = load_recipe(base, [f"model.gaze.top_k={written}"])
    assert recipe.model.gaze.top_k == resolved and not isinstance(recipe.model.gaze.top_k, str)
    again = load_recipe(base, [f"model.gaze.top_k={recipe.model.gaze.top_k if resolved is not None else 'null'}"])
    assert again.model.gaze.top_k == resolved  # the resolved recipe reads back the same


def test_overrides_delete_with_tilde_and_replace_with_colon_equals(tmp_path):
    base = write(tmp_path, "base.yaml", BASE + "init_from: /some/weights\n")
    recipe = load_recipe(base, ["~trainer.max_steps", "~init_from"])
    assert recipe.trainer.max_steps == 1000 and recipe.init_from is None  # back to the schema defaults
    merged = load_recipe(base, ["model.vision.config={patch_size: 8}"])
    assert merged.model.vision.config == {"hidden_size": 32, "patch_size": 8}  # `=` merges a mapping
    replaced = load_recipe(base, ["model.vision.config:={patch_size: 8}"])
    assert replaced.model.vision.config == {"patch_size": 8}  # `:=` replaces it
    nulled = load_recipe(base, ["model.llm.config=null", "model.llm.pretrained=/local/llm"])
    assert nulled.model.llm.config is None and nulled.model.llm.pretrained == "/local/llm"
    with pytest.raises(RecipeError, match="nothing to delete; closest valid key: model.gaze.top_k"):
        load_recipe(base, ["~model.gaze.topk"])


def test_grpo_needs_one_batch_per_step_and_a_reference_for_its_kl(tmp_path):
    base = write(tmp_path, "base.yaml", BASE)
    with pytest.raises(RecipeError, match="trainer.accumulate_grad_batches must be 1"):
        load_recipe(base, ["train.stage=grpo", "trainer.accumulate_grad_batches=2"])
    with pytest.raises(RecipeError, match="train.grpo.kl > 0 needs init_from"):
        load_recipe(base, ["train.stage=grpo", "train.grpo.kl=0.1"])
    assert load_recipe(base, ["train.stage=grpo", "model.look.bias=-inf"]).model.look.bias == float("-inf")


@pytest.mark.parametrize(
    "override,key",
    [("demo.colours=9", "demo.colours"), ("demo.colours=7", "demo.max_objects"),
     ("demo.min_objects=9", "demo.min_objects"), ("demo.max_objects=5", "max_objects (5)")],
)
def test_demo_boards_the_generator_cannot_draw_are_rejected_naming_the_key(override, key):
    """Distinct colours per board: more objects than colours (the demo draws up to 8 of 8), or a minimum
    above the maximum, stop at load time, before any data is generated."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe, [override])
    assert key in str(error.value) and "\n" not in str(error.value)
    sparse = load_recipe(recipe, ["demo.colours=5", "demo.min_objects=2", "demo.max_objects=4"])
    assert (sparse.demo.min_objects, sparse.demo.max_objects, sparse.demo.colours) == (2, 4, 5)
