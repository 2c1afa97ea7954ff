"""Recipes: extends, overrides, interpolation, and errors naming key, file and closest valid key."""

import textwrap

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
