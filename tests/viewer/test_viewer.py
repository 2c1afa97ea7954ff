"""Routing viewer: traced data, the self-contained page (in headless Chromium), PNG stills, TensorBoard."""

import json
import re

import numpy as np
import pytest
import torch

from gazelit.cli import main
from gazelit.viewer.data import reduce_dense, region_groups, trace_generation
from gazelit.viewer.page import render_page
from gazelit.viewer.stills import region_frequency, still, write_stills

from gazelit.datamodules.inference import Prompt

from ..builders import picture, tiny_vlm
from .cdp import Browser, find_chromium


def _page_data(html: str) -> dict:
    payload = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', html, re.DOTALL).group(1)
    return json.loads(payload)


def test_traced_data_matches_the_generation():
    model = tiny_vlm(top_k=1)
    out, data = trace_generation(model, Prompt("What colour is the circle?", images=[picture(size=(64, 32))]),
                                 max_new_tokens=6)
    t = len(out.trace.tokens)
    assert data.tokens == out.trace.tokens and data.answer == out.text
    assert data.selection["unit"].shape == (t, 2, 4, 1) and data.dense.shape == (t, 2, 4, 16)
    assert data.dense_detail == "head"
    assert ((data.dense.sum(-1) > 0) & (data.dense.sum(-1) <= 1 + 1e-5)).all()
    assert data.images[0].size == (64, 64)  # padded to a square, as the model sees it
    assert data.units[0]["tiles"] == [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]
    assert data.model["kv_size"] == "4+2"
    freq = region_frequency(data, 0)
    assert sum(freq.values()) == pytest.approx(1.0)  # k=1: one region per (layer, head)


def test_dense_maps_shrink_to_the_budget_and_regions_group_frames():
    maps = torch.rand(3, 2, 4, 16)
    assert reduce_dense(maps, budget=10**6)[1] == "head"
    layer, detail = reduce_dense(maps, budget=3 * 2 * 16)
    assert detail == "layer" and np.allclose(layer[:, :, 0], maps.mean(2).numpy())
    assert reduce_dense(maps, budget=10)[1] == "mean" and reduce_dense(maps, budget=10)[0].shape == (3, 1, 1, 16)
    units = [{"video": 0, "time": t} for t in (2, 0, 1)] + [{"video": -1, "time": 0}]
    assert region_groups(units, 2) == [[0], [1, 2], [1, 2], [3]]


def test_page_is_self_contained_and_escapes_the_payload():
    model = tiny_vlm(top_k=1)
    _, data = trace_generation(model, Prompt("</script><b>hi</b>", images=[picture()]), max_new_tokens=3)
    page = render_page(data.to_json())
    assert not re.search(r'(src|href)="https?:', page) and "fetch(" not in page
    assert "<b>hi</b>" not in page  # escaped in the header, \u003c in the JSON
    restored = _page_data(page)
    assert restored["prompt"] == "</script><b>hi</b>"
    assert restored["selection"]["unit"] == data.selection["unit"].reshape(-1).tolist()
    assert restored["images"][0].startswith("data:image/png;base64,")


def test_stills_and_tensorboard(tmp_path):
    model = tiny_vlm(top_k=2)
    frames = [picture((70 * i, 50, 50)) for i in range(3)]
    _, data = trace_generation(model, Prompt("What happens?", frames=frames), max_new_tokens=3)
    assert len(data.units) == 3 and data.model["kv_size"] == "8+6"
    image = still(data, 0, side=96)
    assert image.size[0] == 3 * (2 * 96 + 18)
    paths = write_stills(data, tmp_path)
    assert [p.name for p in paths][-1] == "summary.png" and len(paths) == data.num_tokens + 1
    from gazelit.viewer.stills import log_to_tensorboard

    log_to_tensorboard(paths[:2], tmp_path / "tb")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium); "
                                             "CI installs it in .ci/run")
def test_page_in_headless_chromium(tmp_path, capsys):
    model = tiny_vlm(top_k=1, seed=3)
    model.save_pretrained(tmp_path / "model")
    picture(size=(80, 64)).save(tmp_path / "image.png")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        picture((60 * i, 80, 160), shape="square").save(frames / f"{i}.png")
    main(["generate", str(tmp_path / "model"), "--image", str(tmp_path / "image.png"), "--prompt",
          "What colour is the circle?", "--max-new-tokens", "8", "--trace", str(tmp_path / "image")])
    main(["generate", str(tmp_path / "model"), "--frames", str(frames), "--prompt", "What happens?",
          "--max-new-tokens", "4", "--trace", str(tmp_path / "video")])
    answer = capsys.readouterr().out.splitlines()[0]
    page = tmp_path / "image" / "index.html"
    data = _page_data(page.read_text())
    assert data["answer"] == answer and (tmp_path / "image" / "stills" / "summary.png").is_file()

    # tokens whose selections (all layers, every head) differ, from the embedded trace
    t_count, layers, heads, k = data["selection"]["shape"]

    def regions(t):
        flat = [(data["selection"]["unit"][((t * layers + l) * heads + h) * k + j],
                 data["selection"]["tile"][((t * layers + l) * heads + h) * k + j])
                for l in range(layers) for h in range(heads) for j in range(k)]
        return {(u, tile) for u, tile in flat if u >= 0}

    pair = next(((a, b) for a in range(t_count) for b in range(t_count) if regions(a) != regions(b)), None)
    assert pair is not None, "the generation selects the same regions for every token"
    first, second = pair

    def shown(browser):
        rects = browser.evaluate("JSON.stringify([...document.querySelectorAll('svg.routing rect.sel')]"
                                 ".map(r => [+r.dataset.unit, +r.dataset.tile]))")
        return {tuple(x) for x in json.loads(rects)}

    def click_token(browser, t):
        box = json.loads(browser.evaluate(
            f"JSON.stringify(document.querySelector('.tok[data-t=\"{t}\"]').getBoundingClientRect())"))
        browser.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)

    with Browser(CHROMIUM) as browser:
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1100, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        browser.navigate(page.as_uri())
        assert browser.errors() == []
        assert browser.evaluate("document.querySelectorAll('.tok').length") == t_count
        click_token(browser, first)
        assert browser.evaluate("window.gazeViewer.state.pinned") == first
        before = shown(browser)
        click_token(browser, second)
        after = shown(browser)
        assert before == regions(first) and after == regions(second) and before != after
        # one layer, each head in its colour: one outline per (head, selected region)
        browser.evaluate("const s = document.getElementById('layer'); s.value = '1';"
                         "s.dispatchEvent(new Event('change'))")
        per_head = json.loads(browser.evaluate(
            "JSON.stringify([...document.querySelectorAll('rect.sel')].map(r => +r.dataset.head))"))
        units = data["selection"]["unit"]
        expected = [h for h in range(heads) for j in range(k)
                    if units[((second * layers + 1) * heads + h) * k + j] >= 0]
        assert sorted(per_head) == sorted(expected)
        alpha = browser.evaluate("(() => { const c = document.querySelector('canvas.dense');"
                                 "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
                                 ".filter((v, i) => i % 4 == 3).reduce((a, b) => a + b, 0); })()")
        assert alpha > 0  # the dense map is drawn
        browser.screenshot(str(tmp_path / "image.png.screenshot.png"))
        browser.navigate((tmp_path / "video" / "index.html").as_uri())
        assert browser.errors() == []
        assert browser.evaluate("document.querySelectorAll('svg.routing').length") == 3  # one per frame
        assert browser.evaluate("document.querySelectorAll('rect.sel').length") > 0


def _look_trace():
    """A look model made to write `<look> box ... </look>`, traced: (output, viewer data)."""
    model = tiny_vlm(top_k=1, look={"enabled": True, "bins": 4})
    t = model.look_tokens
    loc = {b: i for i, b in t.locs.items()}
    script = {0: t.open, 1: loc[0], 2: loc[2], 3: loc[1], 4: loc[3], 6: t.close}
    others = [i for i in range(len(model.tokenizer)) if i not in {t.open, t.close, *t.locs, model.tokenizer.eos_token_id}]
    return trace_generation(model, Prompt("What colour is the circle?", images=[picture()]), max_new_tokens=8,
                            prefix_allowed_tokens_fn=lambda _b, ids: [script[len(ids)]] if len(ids) in script
                            else others)  # fmt: skip


def test_generated_look_spans_are_in_the_trace_and_the_page_data():
    """The viewer data holds the generated span with its box and token range, and the page embeds it."""
    out, data = _look_trace()
    assert data.looks == [{"unit": 0, "box": [0.0, 0.5, 0.5, 1.0], "start": 4, "end": 6, "text": out.looks[0].text}]
    assert "<look>" not in out.text and data.answer == out.text
    assert _page_data(render_page(data.to_json()))["looks"] == data.looks


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_the_page_outlines_a_look_box_solid_while_the_token_is_inside_the_span(tmp_path):
    _, data = _look_trace()
    (tmp_path / "index.html").write_text(render_page(data.to_json()))
    with Browser(CHROMIUM) as browser:
        browser.navigate((tmp_path / "index.html").as_uri())
        assert browser.errors() == []
        for token, active in ((4, 1), (6, 0)):
            browser.evaluate(f"window.gazeViewer.pin({token})")
            assert browser.evaluate("document.querySelectorAll('svg.routing rect.look').length") == 1
            assert browser.evaluate("document.querySelectorAll('svg.routing rect.look.active').length") == active
