"""The inference-side commands are registered and fail with clear messages."""

import pytest

from gazelit.cli import COMMANDS, build_parser, main
from gazelit.cli.loading import load_model

from gazelit.datamodules.inference import Prompt, PromptEncoder, load_image

from ..builders import picture, tiny_vlm


def test_commands_are_registered():
    for name in ("cost", "eval", "generate", "analyze"):
        assert f"gazelit.cli.{name}_cmd" in COMMANDS
    parser = build_parser()
    args = parser.parse_args(["eval", "m", "--bench", "gqa", "--data", "d.jsonl", "--top-k", "all"])
    assert args.top_k == "all" and args.func.__module__ == "gazelit.cli.eval_cmd"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "m", "--bench", "nope", "--data", "d.jsonl"])


def test_generate_prints_the_answer_for_dense_and_gaze_models(tmp_path, capsys):
    picture().save(tmp_path / "p.png")
    tiny_vlm(enabled=False).save_pretrained(tmp_path / "dense")
    main(["generate", str(tmp_path / "dense"), "--image", str(tmp_path / "p.png"), "--prompt", "Colour?",
          "--max-new-tokens", "3"])
    model = load_model(tmp_path / "dense")
    batch = PromptEncoder.from_model(model).batch([Prompt("Colour?", images=[load_image(tmp_path / "p.png")])])
    expected = model.generate_from_batch(batch, max_new_tokens=3)[0].text
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(ValueError, match="gaze-enabled"):  # the viewer needs the gaze backend's probe hook
        main(["generate", str(tmp_path / "dense"), "--image", str(tmp_path / "p.png"), "--prompt", "Colour?",
              "--max-new-tokens", "2", "--trace", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="--tensorboard needs --trace"):
        main(["generate", str(tmp_path / "dense"), "--prompt", "hi", "--tensorboard", str(tmp_path / "tb")])
    tiny_vlm().save_pretrained(tmp_path / "gaze")
    main(["generate", str(tmp_path / "gaze"), "--prompt", "No picture at all", "--max-new-tokens", "2",
          "--trace", str(tmp_path / "text"), "--sample", "--temperature", "0.7"])
    assert (tmp_path / "text" / "index.html").is_file()  # a text-only trace still renders


def test_generate_prints_each_generated_look_after_the_answer(capsys):
    from types import SimpleNamespace

    from gazelit.cli.generate_cmd import _print_looks
    from gazelit.models.gaze_vlm import GeneratedLook

    _print_looks(SimpleNamespace(looks=[GeneratedLook(0, (0.25, 0.0, 0.5, 0.5), 4, 7, "red circle"),
                                        GeneratedLook(0, (0.0, 0.0, 1.0, 1.0), 9, None, "")]))  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert err == ["look: unit 0, box [0.250, 0.000, 0.500, 0.500]: 'red circle'",
                   "look: unit 0, box [0.000, 0.000, 1.000, 1.000] (never closed): ''"]  # fmt: skip
