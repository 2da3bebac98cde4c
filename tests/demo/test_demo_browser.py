"""The web demo in a real browser: Debian's headless chromium, driven by selenium through Debian's chromedriver
(both installed by scripts/install.sh; nothing is downloaded at run time), against the demos of tiny random
models of every mode (one Gradio server each, started once for the module) and of the built-in model (served by
the real command, ``ldm-diffusers demo --port N``, in a subprocess).

Each test types, picks, uploads or draws as a person would, then checks what the page shows and the files it
serves (the gallery image, the input files of the reproduce command). Screenshots go to ``$LDM_DEMO_SCREENSHOTS``
(default: pytest's temporary folder); the ones in docs/demo/ were taken with
``LDM_DEMO_SCREENSHOTS=docs/demo python -m pytest tests/demo/test_demo_browser.py``.
"""

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium; scripts/install.sh)"),
    pytest.mark.skipif(CHROMEDRIVER is None,
                       reason="no chromedriver binary (apt-get install chromium-driver; scripts/install.sh)"),
]

from helpers.models import demo_pipe, gradient
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from ldm_diffusers.cli import parse_generate_args

TINY_MODES = ["text", "class", "layout", "super_resolution", "inpainting", "segmentation"]
WAIT = 60  # seconds for anything the page does (a tiny model samples in well under a second)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{mode: url} of the tiny models' demos, and "builtin": the built-in model's, served by the CLI."""
    from helpers.local_hub import free_port

    from ldm_diffusers.demo.app import build_demo

    port = free_port()
    log_path = tmp_path_factory.mktemp("demo") / "builtin.log"
    with open(log_path, "w") as log:
        builtin = subprocess.Popen([sys.executable, "-m", "ldm_diffusers.cli", "demo", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
    demos, urls = [], {"builtin": f"http://127.0.0.1:{port}/"}
    try:
        for mode in TINY_MODES:
            demo = build_demo(demo_pipe(mode), f"tiny-{mode}")
            demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True, ssr_mode=False)
            demos.append(demo)
            urls[mode] = demo.local_url
        deadline = time.monotonic() + 120  # the subprocess imports torch and Gradio and loads the model
        while True:
            try:
                urllib.request.urlopen(urls["builtin"], timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert builtin.poll() is None, f"ldm-diffusers demo exited with {builtin.returncode}; see {log_path}"
                assert time.monotonic() < deadline, f"ldm-diffusers demo did not answer within 120 s; see {log_path}"
                time.sleep(0.2)
        yield urls
    finally:
        for demo in demos:
            demo.close()
        builtin.terminate()
        builtin.wait(30)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # the image editor draws with WebGL: SwiftShader (software) renders it without a GPU, about 3x faster than
    # chromium's fallback under --disable-gpu
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",
                 "--window-size=1400,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = Path(os.environ.get("LDM_DEMO_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- what a person does ---------------------------------------------------------------------------------
def wait(driver, condition, timeout=WAIT):
    return WebDriverWait(driver, timeout).until(condition)


def find(driver, css):
    return wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, css))


def open_demo(driver, url, seed: int = 0, steps: int = 4):
    """Load the page; a fixed ``seed`` (the "random seed" box unticked) and ``steps``."""
    driver.get(url)
    find(driver, "#random-seed input").click()
    for css, value in (("#seed input", seed), ("#steps input[type=number]", steps)):
        box = find(driver, css)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)


def watch_progress(driver):
    """Record every text the progress indicator shows from now on (a MutationObserver: no polling)."""
    driver.execute_script("""
        window.progressTexts = new Set();
        new MutationObserver(() => document.querySelectorAll('.progress-level, .progress-text')
            .forEach(e => window.progressTexts.add(e.textContent.trim())))
          .observe(document.body, {subtree: true, childList: true, characterData: true});""")


def generate(driver) -> Image.Image:
    """Click Generate and return the first gallery image, as the server sends it."""
    find(driver, "#generate").click()
    return image_at(find(driver, "#gallery img").get_attribute("src"))


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def image_at(url: str) -> Image.Image:
    return Image.open(io.BytesIO(download(url)))


def input_file(driver, name: str) -> bytes:
    """The input file ``name`` of the reproduce command, downloaded from the page's file list."""
    link = wait(driver, lambda d: next((a for a in d.find_elements(By.CSS_SELECTOR, "#input-files a")
                                        if a.get_attribute("href").endswith("/" + name)), None))
    return download(link.get_attribute("href"))


def input_image(driver, name: str) -> Image.Image:
    return Image.open(io.BytesIO(input_file(driver, name)))


def error_message(driver) -> str:
    """The text of the error toast, once it has faded in (Selenium reads visible text only)."""
    css = "[data-testid=toast-body].error [data-testid=toast-text]"
    return wait(driver, lambda d: next((e.text for e in d.find_elements(By.CSS_SELECTOR, css) if e.text), None))


def upload(driver, css: str, image: Image.Image, tmp_path: Path, name: str = "upload.png"):
    image.save(tmp_path / name)
    find(driver, f"{css} input[type=file]").send_keys(str(tmp_path / name))


def upload_to_editor(driver, css: str, image: Image.Image, tmp_path: Path, name: str = "upload.png"):
    """Upload ``image`` as the image editor's background and wait until the editor shows it (its empty-canvas
    hint is gone)."""
    upload(driver, css, image, tmp_path, name)
    wait(driver, lambda d: "select the draw tool" not in d.find_element(By.CSS_SELECTOR, css).text)


def draw_stroke(driver, editor_css: str):
    """Drag the brush 120 px across the middle of the editor's canvas (its uploaded or blank image, zoomed to fit),
    once the editor shows an image (its zoom level, no empty-canvas hint)."""
    wait(driver, lambda d: (text := d.find_element(By.CSS_SELECTOR, editor_css).text).endswith("%")
         and "select the draw tool" not in text)
    canvas = driver.find_elements(By.CSS_SELECTOR, f"{editor_css} canvas")[-1]
    ActionChains(driver, duration=10).move_to_element_with_offset(canvas, -60, 0).click_and_hold() \
        .move_by_offset(60, 0).move_by_offset(60, 0).release().perform()


def not_blank(image: Image.Image) -> bool:
    return np.asarray(image.convert("RGB"), np.float32).std() > 5  # 0..255: a flat or nearly flat image is blank


def command(driver) -> list[str]:
    words = shlex.split(find(driver, "#command textarea").get_attribute("value"))
    assert words[:2] == ["ldm-diffusers", "generate"]
    return words[2:]


# -- the tests ------------------------------------------------------------------------------------------
def test_prompt_generates_with_progress(servers, browser):
    open_demo(browser, servers["text"], seed=7, steps=30)
    find(browser, "#prompt textarea").send_keys("an emoji of a cat")
    find(browser, "#negative-prompt textarea").send_keys("blurry")
    watch_progress(browser)
    image = generate(browser)
    assert image.size == (32, 32) and not_blank(image)
    shown = browser.execute_script("return [...window.progressTexts]")
    assert any(t.startswith("Denoising") for t in shown) and any("/30 steps" in t for t in shown), shown
    a = parse_generate_args(command(browser))
    assert (a.prompt, a.negative_prompt, a.seed, a.steps, a.model) == (["an emoji of a cat"], "blurry", 7, 30,
                                                                       "tiny-text")
    assert "seed 7" in find(browser, "#gallery").text  # the parameters under the image
    assert '"negative_prompt":"blurry"' in find(browser, "#parameters").text.replace("\n", "")


def test_builtin_model_through_the_command_line(servers, browser, screenshots):
    open_demo(browser, servers["builtin"], seed=3, steps=10)  # the model's default sampling
    find(browser, "#prompt textarea").send_keys("an emoji of a red apple")
    image = generate(browser)
    assert image.size == (64, 64) and not_blank(image)
    assert parse_generate_args(command(browser)).model == "builtin:emoji-text-to-image"
    browser.save_screenshot(str(screenshots / "text-to-image.png"))


def test_class_is_picked_from_the_dropdown(servers, browser, screenshots):
    open_demo(browser, servers["class"])
    find(browser, "#class input").click()
    find(browser, "[role=option][aria-label='class 3']").click()
    image = generate(browser)
    assert image.size == (32, 32) and not_blank(image)
    assert parse_generate_args(command(browser)).class_labels == [3]
    browser.save_screenshot(str(screenshots / "class.png"))


def test_super_resolution_upload(servers, browser, screenshots, tmp_path):
    open_demo(browser, servers["super_resolution"])
    upload(browser, "#low-res", gradient(12, 8), tmp_path)
    find(browser, "#low-res img")
    image = generate(browser)
    assert image.size == (48, 32) and not_blank(image)  # f = 4 times the 12x8 input
    assert input_image(browser, "image.png").size == (12, 8)
    browser.save_screenshot(str(screenshots / "super-resolution.png"))


def test_inpainting_changes_only_the_drawn_mask(servers, browser, screenshots, tmp_path):
    open_demo(browser, servers["inpainting"])
    original = gradient(64, 64)
    upload_to_editor(browser, "#inpaint-editor", original, tmp_path)
    draw_stroke(browser, "#inpaint-editor")
    result = np.asarray(generate(browser).convert("RGB"), np.int16)
    mask = np.asarray(input_image(browser, "mask.png").convert("L")) > 0
    assert np.array_equal(np.asarray(input_image(browser, "image.png").convert("RGB")), np.asarray(original))
    assert mask[32, 32] and not mask[:8].any() and not mask[-8:].any()  # the stroke across the middle, only there
    difference = np.abs(result - np.asarray(original, np.int16))
    assert difference[~mask].max() <= 2  # outside the mask: the uploaded image
    assert difference[mask].mean() > 10  # inside: generated
    browser.save_screenshot(str(screenshots / "inpainting.png"))
    open_demo(browser, servers["inpainting"])  # sides the model cannot take: padded, sampled, cropped back
    upload_to_editor(browser, "#inpaint-editor", gradient(30, 30), tmp_path, "odd.png")
    draw_stroke(browser, "#inpaint-editor")
    assert generate(browser).size == (30, 30)


def test_bad_inputs_show_a_message(servers, browser, screenshots, tmp_path):
    open_demo(browser, servers["inpainting"])
    upload_to_editor(browser, "#inpaint-editor", gradient(64, 64), tmp_path)
    find(browser, "#generate").click()
    assert error_message(browser).startswith("Draw a mask first")
    browser.save_screenshot(str(screenshots / "bad-input.png"))
    open_demo(browser, servers["text"])
    find(browser, "#generate").click()
    assert error_message(browser) == "Type a prompt first."
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img")


def edit_cell(driver, row: int, column: int, text: str):
    cell = f'#layout-table [data-testid="cell-{row}-{column}"]'
    ActionChains(driver).double_click(find(driver, cell)).perform()
    box = find(driver, f"{cell} textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text, Keys.ENTER)
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, cell).text.split("\n")[0] == text)


def test_layout_table_with_preview(servers, browser, screenshots):
    from ldm_diffusers.conditioning.widgets import class_colors

    open_demo(browser, servers["layout"])
    before = find(browser, "#layout-preview img").get_attribute("src")
    for column, text in enumerate(["3", "0.5", "0.2", "0.9", "0.8"]):
        edit_cell(browser, 1, column, text)
    src = wait(browser, lambda d: (s := d.find_element(By.CSS_SELECTOR, "#layout-preview img").get_attribute("src"))
               != before and s)
    preview = np.asarray(image_at(src).convert("RGB"))
    height, width = preview.shape[:2]
    left_edge = preview[int(0.5 * height):int(0.75 * height), round(0.5 * (width - 1))]  # below the class label
    assert (left_edge == class_colors(5)[3]).all(axis=-1).all()
    image = generate(browser)
    assert image.size == (32, 32) and not_blank(image)
    assert json.loads(input_file(browser, "layout.json")) == [[0, [0.1, 0.1, 0.6, 0.7]], [3, [0.5, 0.2, 0.9, 0.8]]]
    browser.save_screenshot(str(screenshots / "layout.png"))


def test_segmentation_map_drawn_by_hand(servers, browser, screenshots):
    open_demo(browser, servers["segmentation"])
    draw_stroke(browser, "#segmentation-editor")
    image = generate(browser)
    assert image.size == (32, 32) and not_blank(image)
    ids = np.asarray(input_image(browser, "segmentation.png"))
    assert ids.shape == (32, 32) and set(np.unique(ids)) == {0, 1}  # class 0 everywhere, the brush's class 1 drawn
    assert ids[16, 16] == 1 and ids[0, 0] == ids[-1, -1] == 0
    browser.save_screenshot(str(screenshots / "segmentation.png"))
