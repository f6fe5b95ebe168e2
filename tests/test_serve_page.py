"""The few-shot page at ``/``, end to end in headless Chromium driven by Playwright, on the built-in
model (what ``flamingo-vlm serve`` serves by default) and the bundled example images.

Needs Debian's chromium (``apt-get install -y chromium``) and the ``playwright`` Python package (its
own browser downloads are never used). Outside CI a missing browser skips this test; in CI
(``CI=true``) it fails, so the page is always tested there. The screenshot is written to
``test-artifacts/serve-page.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from test_serve_fixtures import running_builtin_server

from flamingo_vlm.generate import example_image
from flamingo_vlm.registry import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("FLAMINGO_VLM_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI: apt-get install -y chromium; pip install playwright)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = chromium_path()
    if executable is None:
        _missing("Chromium is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright Python package is not installed (pip install playwright)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def server():
    with running_builtin_server() as s:
        yield s


@pytest.fixture(scope="module")
def picture_files():
    """A demonstration scene and a query scene of the bundled demo (its captioning task)."""
    return [example_image("scene1.png"), example_image("scene3.png")]


def test_few_shot_page_streams_a_completion(browser, server, picture_files):
    base, engine = server
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/")
    page.wait_for_function(f"document.querySelector('#model-info').textContent.includes('{DEFAULT_MODEL}')")

    # Step 1 (a demonstration): image through the file picker, then its text.
    shots = page.locator("#shots .shot")
    assert shots.count() == 1
    shots.nth(0).locator("input.shot-file").set_input_files(str(picture_files[0]))
    page.wait_for_function("document.querySelectorAll('#shots .shot')[0].dataset.image !== undefined")
    shots.nth(0).locator("textarea.shot-text").fill("Output:a small blue square on the left.")

    # Step 2 (the query).
    page.click("#add-shot")
    assert shots.count() == 2
    shots.nth(1).locator("input.shot-file").set_input_files(str(picture_files[1]))
    page.wait_for_function("document.querySelectorAll('#shots .shot')[1].dataset.image !== undefined")
    shots.nth(1).locator("textarea.shot-text").fill("Output:")

    # The steps are joined with the model's demonstration separator (the built-in model's "\n", shown
    # escaped in the preview), as the server's chat mapping and `generate --demo` join them.
    assert engine.demo_separator == "\n"
    prompt = "<image>Output:a small blue square on the left.<|endofchunk|>\n<image>Output:"
    preview = page.text_content("#prompt-preview")
    assert preview.replace("\n", "") == prompt.replace("\n", "\\n")
    page.fill("#max-tokens", "12")

    before = engine.stats.snapshot()["generation_requests"]
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').dataset.state === 'done'", timeout=60_000)
    output = page.text_content("#output")
    assert output.strip() and "ended its answer" not in output, output
    assert "generated" in page.text_content("#usage")
    assert engine.stats.snapshot()["generation_requests"] == before + 1

    # The page shows what the API answers for the same prompt.
    import base64
    import httpx

    images = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in picture_files]
    api = httpx.post(base + "/v1/completions", timeout=60, json={
        "prompt": prompt, "images": images,
        "max_tokens": 12, "temperature": 0}).json()
    assert output == api["choices"][0]["text"]
    assert page.text_content("#usage").startswith(f"{api['usage']['prompt_tokens']} prompt tokens")  # the same prompt

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not errors, errors

    # Drag & drop: an image file dropped on the page adds a step holding it.
    png_b64 = base64.b64encode(picture_files[0].read_bytes()).decode()
    transfer = page.evaluate_handle("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        return dt;
    }""", png_b64)
    page.dispatch_event("#output-panel", "drop", {"dataTransfer": transfer})
    page.wait_for_function("document.querySelectorAll('#shots .shot').length === 3 && "
                           "document.querySelectorAll('#shots .shot')[2].dataset.filename === 'dropped.png'")
    # ... and one dropped on a step's image area sets that step's image.
    page.click("#shots .shot:nth-child(3) .remove-image")
    page.dispatch_event("#shots .shot:nth-child(3) .drop", "drop", {"dataTransfer": transfer})
    page.wait_for_function("document.querySelectorAll('#shots .shot').length === 3 && "
                           "document.querySelectorAll('#shots .shot')[2].dataset.image !== undefined")
    assert page.text_content("#prompt-preview").count("<image>") == 3

    # An error from the server is shown on the page, and the page keeps working.
    page.fill("#max-tokens", str(engine.max_context + 1))
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').dataset.state === 'error'", timeout=30_000)
    assert "context length" in page.text_content("#output")
    page.close()


def test_an_image_error_names_the_step_and_file(browser, server, picture_files, tmp_path):
    """The server names a bad image by its place in the request (param "images[1]"); the page said
    only "cannot decode the image", leaving the user to guess which of the dropped files it was."""
    base, _ = server
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG")
    page = browser.new_page()
    page.goto(base + "/")
    page.wait_for_function(f"document.querySelector('#model-info').textContent.includes('{DEFAULT_MODEL}')")
    shots = page.locator("#shots .shot")
    shots.nth(0).locator("input.shot-file").set_input_files(str(picture_files[0]))
    page.wait_for_function("document.querySelectorAll('#shots .shot')[0].dataset.image !== undefined")
    page.click("#add-shot")
    shots.nth(1).locator("input.shot-file").set_input_files(str(broken))
    page.wait_for_function("document.querySelectorAll('#shots .shot')[1].dataset.image !== undefined")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').dataset.state === 'error'", timeout=30_000)
    output = page.text_content("#output")
    assert "step 2 (broken.png)" in output and "cannot decode the image" in output, output
    page.close()


def test_settings_out_of_range_are_refused_not_replaced(browser, server):
    """Max tokens 0 was sent as 32 (and top-p 0 as 1) without a word; the server's error shows now."""
    base, _ = server
    page = browser.new_page()
    page.goto(base + "/")
    page.wait_for_function(f"document.querySelector('#model-info').textContent.includes('{DEFAULT_MODEL}')")
    page.fill("#max-tokens", "0")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').dataset.state === 'error'", timeout=30_000)
    assert "max_tokens" in page.text_content("#output")
    page.fill("#max-tokens", "2")
    page.fill("#top-p", "0")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').dataset.state === 'error'", timeout=30_000)
    assert "top_p" in page.text_content("#output")
    page.close()


def test_a_cut_stream_is_an_error_not_an_answer(browser, server):
    """A stream that ends without [DONE] (server gone, a proxy's timeout) was shown as "done (stop)"
    with the partial text as the answer."""
    base, _ = server
    page = browser.new_page()
    page.goto(base + "/")
    page.wait_for_function(f"document.querySelector('#model-info').textContent.includes('{DEFAULT_MODEL}')")
    page.route("**/v1/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"},
        body='data: {"choices": [{"index": 0, "text": "a large", "finish_reason": null}]}\n\n'))
    page.click("#generate")
    page.wait_for_function("['done', 'error'].includes(document.querySelector('#status').dataset.state)",
                           timeout=30_000)
    assert page.get_attribute("#status", "data-state") == "error"
    output = page.text_content("#output")
    assert "closed before the answer was finished" in output and "a large" in output, output
    page.close()


def test_a_thin_strip_image_is_sent(browser, server, tmp_path):
    """The page downscales images over 1024 px; a 1 x 5000 strip rounded to a 0-pixel-wide canvas,
    whose data URL ("data:,") the server refused as malformed."""
    from PIL import Image

    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 5000), (200, 30, 30)).save(strip)
    base, _ = server
    page = browser.new_page()
    page.goto(base + "/")
    page.wait_for_function(f"document.querySelector('#model-info').textContent.includes('{DEFAULT_MODEL}')")
    page.locator("#shots .shot").nth(0).locator("input.shot-file").set_input_files(str(strip))
    page.wait_for_function("document.querySelectorAll('#shots .shot')[0].dataset.image !== undefined")
    assert page.evaluate("document.querySelector('#shots .shot').dataset.image.length") > 30
    page.fill("#max-tokens", "2")
    page.click("#generate")
    page.wait_for_function("['done', 'error'].includes(document.querySelector('#status').dataset.state)",
                           timeout=60_000)
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#output")
    page.close()


def test_add_images_on_a_fresh_page_fills_the_query_step(browser, server, picture_files):
    """"+ Add images…" on the fresh page (one step, "Output:" and no image) left that step imageless
    and added one step per image after it: the prompt began with a text-only demonstration
    ("Output:<|endofchunk|>\\n<image><|endofchunk|>\\n<image>"). The first image now goes to the step
    that has none."""
    base, _ = server
    page = browser.new_page()
    page.goto(base + "/")
    page.wait_for_function(f"document.querySelector('#model-info').textContent.includes('{DEFAULT_MODEL}')")
    page.set_input_files("#add-files", [str(p) for p in picture_files])
    page.wait_for_function("document.querySelectorAll('#shots .shot').length === 2 && "
                           "[...document.querySelectorAll('#shots .shot')].every((s) => s.dataset.image)")
    preview = page.text_content("#prompt-preview").replace("\n", "")
    assert preview == "<image>Output:<|endofchunk|>\\n<image>", preview
    # Once every step has an image, more images add steps.
    page.set_input_files("#add-files", str(picture_files[0]))
    page.wait_for_function("document.querySelectorAll('#shots .shot').length === 3")
    assert page.text_content("#prompt-preview").count("<image>") == 3
    page.close()
