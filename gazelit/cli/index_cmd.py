"""`gazelit index SHARDS...`: write manifest.json for existing WebDataset shards (counts, sizes, sha256)."""

from gazelit.datamodules.index import add_index_arguments, run_index


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "index", help="write a manifest for existing WebDataset shards",
        description="Count the samples of existing .tar shards (webdataset TarWriter / ShardWriter output) and "
                    "write manifest.json beside them with each shard's sample count, size and sha256, so they "
                    "stream like `gazelit convert` output.",
    )  # fmt: skip
    add_index_arguments(parser)
    parser.set_defaults(func=run_index)
