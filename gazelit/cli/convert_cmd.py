"""`gazelit convert`: Cambrian-style JSONL + media -> WebDataset shards and a manifest."""

from gazelit.datamodules.convert import add_convert_arguments, run_convert


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert LLaVA/Cambrian JSONL and media into WebDataset shards",
        description="Write tar shards (KEY.json + media) and manifest.json; bad records are skipped and listed.",
    )
    add_convert_arguments(parser)
    parser.set_defaults(func=run_convert)
