"""The demo app (``di-star serve``) in a real browser: headless Chromium driven by playwright, on the tiny model.

The page must show the pipeline's own pixels: the image is fetched from its ``<img src>`` and compared exactly with
``DIStarSDXLPipeline`` for the same prompt, seed and size. Every wait is on a condition in the page, never a sleep
(one test slows the server's generation so that keystrokes arrive while a request is in flight).
``DI_STAR_SCREENSHOT=docs/demo_app.png`` also writes the screenshot taken of the real page to that path (how the
one in docs/pipeline.md was made).
"""

import io
import os
import shutil
import socket

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("gradio", reason="the demo app needs gradio: pip install -e '.[demo]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright: pip install -e '.[demo]'")

from diffusers_di_star import DIStarSDXLPipeline  # noqa: E402
from diffusers_di_star.demo_app import read_png_settings  # noqa: E402
from diffusers_di_star.demo_ui import build_app  # noqa: E402

CHROMIUM = os.environ.get("DI_STAR_CHROMIUM") or next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium found: install one (Debian/Ubuntu: `apt-get install chromium`), or point DI_STAR_CHROMIUM "
    "at a Chrome/Chromium binary",
)
WIDTH, HEIGHT = 64, 48  # not square: a swapped width and height would show
TIMEOUT_MS = 120_000  # generous: the page waits on conditions, this only bounds a hang
sync_api.expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from diffusers_di_star.testing import save_tiny_sdxl_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny") / "model")
    app = build_app(model, size=64, device="cpu", dtype="fp32", output_dir=str(tmp_path_factory.mktemp("images")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "model": model}
    app.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server["url"])
    for name, value in (("width", WIDTH), ("height", HEIGHT)):
        page.locator(f"#{name} input").fill(str(value))
    yield page
    page.close()


def _type_prompt(page, text: str) -> None:
    box = page.locator("#prompt textarea")
    box.press("Control+a")
    box.press_sequentially(text)  # a keystroke at a time, as a person types: each starts a live request


def _shown_png(page) -> bytes:
    src = page.locator("#gallery img").first.get_attribute("src")
    response = page.request.get(src)
    assert response.ok, src
    return response.body()


def _pipeline_image(model: str, prompt: str, seed: int) -> np.ndarray:
    pipe = DIStarSDXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return np.asarray(pipe(prompt, width=WIDTH, height=HEIGHT, generator=generator).images[0])


def test_typed_prompt_shows_the_pipeline_image_and_its_png_carries_the_settings(page, server, tmp_path):
    page.locator("#seed input").fill("7")
    prompt = "a cat wearing sunglasses"
    _type_prompt(page, prompt)
    sync_api.expect(page.locator("#status")).to_contain_text(f"{prompt} · 1 image {WIDTH}×{HEIGHT} · seed 7")
    png = _shown_png(page)
    shown = PIL.Image.open(io.BytesIO(png))
    np.testing.assert_array_equal(np.asarray(shown), _pipeline_image(server["model"], prompt, seed=7))
    settings = read_png_settings(io.BytesIO(png))
    assert settings == {"prompt": prompt, "model": server["model"], "seed": 7, "width": WIDTH, "height": HEIGHT,
                        "num_images": 1, "lora": None, "lora_scale": 1.0, "steps": 1}
    download = page.locator("#downloads a").first
    assert page.request.get(download.get_attribute("href")).body() == png  # "download PNG" is the shown image
    assert "ms" in page.locator("#gallery").inner_text()  # the image's latency is in its caption

    shot = tmp_path / "demo_app.png"
    page.screenshot(path=str(shot))
    assert PIL.Image.open(shot).size == (1000, 760)
    if os.environ.get("DI_STAR_SCREENSHOT"):
        PIL.Image.open(shot).convert("P", palette=PIL.Image.Palette.ADAPTIVE).save(os.environ["DI_STAR_SCREENSHOT"])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"#model textarea": "./no/such/model-folder"}, "no such file or folder"),
        ({"#width input": "4096", "#height input": "4096"}, "above this app's limit of 4,194,304 pixels"),
    ],
    ids=["bad-model-path", "size-limit"],
)
def test_bad_request_shows_the_message_in_the_page(page, fields, message):
    for selector, value in fields.items():
        page.locator(selector).fill(value)
    _type_prompt(page, "a red chair")
    sync_api.expect(page.locator("#status")).to_contain_text(message)
    assert page.locator("#gallery img").count() == 0


def test_two_quick_prompts_end_with_the_image_of_the_last(page, server, monkeypatch):
    import threading
    import time

    from diffusers_di_star import demo_ui

    calls, lock = {"in_flight": 0, "most": 0, "prompts": []}, threading.Lock()

    def slow_generate(cache, settings, **kwargs):  # slow enough that keystrokes arrive while one is in flight
        with lock:
            calls["in_flight"] += 1
            calls["most"] = max(calls["most"], calls["in_flight"])
            calls["prompts"].append(settings.prompt)
        time.sleep(0.3)
        try:
            return generate(cache, settings, **kwargs)
        finally:
            with lock:
                calls["in_flight"] -= 1

    generate = demo_ui.generate
    monkeypatch.setattr(demo_ui, "generate", slow_generate)
    _type_prompt(page, "a fox in a snowy forest")
    last = "a bowl of ramen with chopsticks"
    _type_prompt(page, last)  # at once: the requests of the first prompt may still be in flight
    sync_api.expect(page.locator("#status")).to_contain_text(f"{last} · 1 image")
    shown = PIL.Image.open(io.BytesIO(_shown_png(page)))
    np.testing.assert_array_equal(np.asarray(shown), _pipeline_image(server["model"], last, seed=0))
    assert calls["most"] == 1  # the page sends its next request only once the one in flight has shown its images
    assert calls["prompts"][-1] == last


def test_space_app_builds_the_page_from_its_variables(server, monkeypatch):
    import runpy

    import gradio as gr

    monkeypatch.setenv("DI_STAR_MODEL", server["model"])
    monkeypatch.setenv("DI_STAR_SIZE", "64")
    app_file = os.path.join(os.path.dirname(__file__), "..", "examples", "space", "app.py")
    demo = runpy.run_path(app_file, run_name="space")["demo"]
    assert isinstance(demo, gr.Blocks)
    values = [getattr(block, "value", None) for block in demo.blocks.values()]
    assert server["model"] in values and 64 in values


def test_serve_tiny_builds_a_local_model_and_launches_the_page(monkeypatch):
    import gradio as gr

    from diffusers_di_star.cli import main

    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.append((self, kwargs)))
    assert main(["serve", "--tiny", "--port", "0", "--device", "cpu"]) == 0
    (app, kwargs), = launched
    assert kwargs == {"server_name": "127.0.0.1", "server_port": 0}
    model = next(block.value for block in app.blocks.values() if getattr(block, "elem_id", None) == "model")
    assert DIStarSDXLPipeline.from_pretrained(model).unet.config.block_out_channels == [32, 64]  # the tiny SDXL
    assert next(block.value for block in app.blocks.values() if getattr(block, "elem_id", None) == "width") == 64
