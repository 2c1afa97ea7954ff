"""`gazelit validate RECIPE [key=value ...]`: check a recipe and show what it resolves to, building nothing.

Prints the fully resolved recipe and the shapes it implies (gazelit.shapes). Nothing is
downloaded and no model is built; a recipe error exits with status 2 and names the key, the file and the
closest valid key.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate", help="check a recipe; print it resolved and the shapes it implies",
        description="Load and validate a recipe (extends, overrides, interpolation, types) and print the resolved "
                    "YAML and the derived shapes. Builds no model and downloads nothing.",
    )  # fmt: skip
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    parser.add_argument("--quiet", action="store_true", help="print the shapes only, not the resolved YAML")
    parser.add_argument("--offline", action="store_true",
                        help="do not check that data, init_from and resume paths exist (a cluster recipe checked "
                             "elsewhere)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gazelit.recipe import RecipeError, load_recipe, resolved_yaml
    from gazelit.shapes import derive_shapes

    try:
        recipe = load_recipe(args.recipe, args.overrides, paths=not args.offline)
    except RecipeError as e:
        print(f"gazelit validate: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(resolved_yaml(recipe))
    print(f"# {args.recipe}: valid. Derived shapes:")
    for line in derive_shapes(recipe).lines(recipe):
        print(f"#   {line}")
    return 0
