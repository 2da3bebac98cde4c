"""The web demo without a browser: the inputs each mode shows, widget values -> pipeline inputs and their
messages, the reproduce command (run through ``ldm-diffusers generate``: the same images), the queue, and the
Space pushed to the local test Hub. The browser tests are in tests/demo/test_demo_browser.py."""

import shlex
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from helpers.local_hub import point_huggingface_hub_at
from helpers.models import demo_pipe, gradient, make_pipe, painted
from helpers.paths import REPO
from PIL import Image

from ldm_diffusers import LDMPipeline
from ldm_diffusers.cli import main, parse_generate_args
from ldm_diffusers.conditioning import InputError, TextMode
from ldm_diffusers.conditioning import widgets as ui
from ldm_diffusers.demo import Settings, generate_command, run, write_inputs
from ldm_diffusers.demo.app import build_demo

MODES = ["text", "class", "layout", "super_resolution", "inpainting", "segmentation", "unconditional"]
GUIDED = {"text", "class", "layout"}


def sample_inputs(mode: str) -> dict:
    """The pipeline inputs of ``mode`` as the demo's widgets would give them."""
    if mode == "text":
        return ui.text_inputs("an emoji of a cat", "blurry")
    if mode == "class":
        return ui.class_inputs(3)
    if mode == "layout":
        return ui.layout_inputs([[1, 0.1, 0.1, 0.5, 0.6], [3, 0.4, 0.2, 0.9, 0.9], [None] * 5])
    if mode == "super_resolution":
        return ui.super_resolution_inputs(gradient(12, 8))
    if mode == "inpainting":
        return ui.inpainting_inputs({"background": gradient(32, 32), "layers": [painted(32, (8, 8, 24, 20))],
                                     "composite": None})
    if mode == "segmentation":
        color = ui.class_colors(6)[5]
        return ui.segmentation_inputs({"background": ui.blank_segmentation_map((32, 32)),
                                       "layers": [painted(32, (0, 16, 32, 32), color)], "composite": None}, 6)
    return {}


def component_ids(demo) -> dict:
    return {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}


MODE_IDS = {"text": {"prompt", "negative-prompt"}, "class": {"class"}, "layout": {"layout-table", "layout-preview"},
            "super_resolution": {"low-res"}, "inpainting": {"inpaint-editor"},
            "segmentation": {"segmentation-editor", "segmentation-legend"}, "unconditional": set()}
EVERY_MODE = {"sampler", "steps", "guidance", "seed", "random-seed", "num-images", "fast", "generate", "gallery",
              "command", "parameters", "input-files"}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_shows_only_its_inputs(mode):
    pipe = demo_pipe(mode)
    assert pipe.mode.name == mode
    ids = component_ids(build_demo(pipe, "org/tiny"))
    assert set(ids) & set().union(*MODE_IDS.values()) == MODE_IDS[mode]
    assert EVERY_MODE <= set(ids)
    guidance = ids["guidance"]
    assert guidance.interactive == (mode in GUIDED) and guidance.value == (3.0 if mode in GUIDED else 1.0)
    assert not ids["input-files"].visible  # until a request wrote input files
    assert ids["sampler"].value == "dpm++" and "model" in [value for _, value in ids["sampler"].choices]
    if mode == "class":  # the 5 classes, not the null class 5 (the unconditional input)
        assert ids["class"].choices == [(f"class {i}", i) for i in range(5)]
    if mode == "segmentation":  # one brush colour per class, and the legend names them
        assert len(ids["segmentation-editor"].brush.colors) == 6 and "class&nbsp;5" in ids["segmentation-legend"].value
    if mode == "layout":
        assert ids["layout-table"].headers == ["class", "x0", "y0", "x1", "y1"]


def test_guidance_only_where_the_model_has_an_unconditional_input():
    from ldm_diffusers import ClassEmbedder

    pipe = make_pipe("class")
    assert pipe.mode.can_guide(pipe)
    pipe.class_embedder = ClassEmbedder(num_classes=5, context_dim=16, has_null_class=False)  # CompVis cin256-like
    assert not pipe.mode.can_guide(pipe)
    assert not component_ids(build_demo(pipe, "org/tiny"))["guidance"].interactive


@pytest.mark.parametrize("mode", MODES)
def test_the_shown_command_makes_the_same_images(mode, tmp_path, monkeypatch):
    """The demo's call, then its ``ldm-diffusers generate`` line run in a folder holding the input files it wrote:
    the same pixels (inpainting: the same inside the mask; outside it the demo keeps the user's image)."""
    demo_pipe(mode).save_pretrained(tmp_path / "model")
    model = str(tmp_path / "model")
    pipe = LDMPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    inputs = sample_inputs(mode)
    settings = Settings("ddim", 3, 2.0 if mode in GUIDED else 1.0, seed=2**40 + 7,
                        num_images=2 if mode == "unconditional" else 1)
    steps = []
    images = run(pipe, pipe.scheduler, inputs, settings, lambda done, total: steps.append((done, total)))
    if mode == "super_resolution":  # 12 x 8 upload, wider than the 8 x 8 trained latent: 2 windows per pass
        assert steps == [(2, 8), (4, 8), (6, 8), (8, 8)]  # 3 steps and the decode
    else:
        assert steps == [(1, 3), (2, 3), (3, 3)]
    expected = np.concatenate([np.asarray(image, np.int16) for image in images], axis=1)  # generate's grid: 1 row

    folder = tmp_path / "run"
    folder.mkdir()
    mode_words, written = write_inputs(pipe.mode, inputs, folder)
    line = generate_command(model, mode_words, settings, "cpu")
    words = shlex.split(line)
    assert words[:2] == ["ldm-diffusers", "generate"]
    assert bool(written) == (mode in ("layout", "super_resolution", "inpainting", "segmentation"))
    assert all(f" {path.name} " in f"{line} " for path in written)
    monkeypatch.chdir(folder)
    main(words[1:])
    produced = np.asarray(Image.open(folder / "samples.png"), np.int16)
    assert produced.shape == expected.shape
    if mode == "inpainting":
        mask = np.asarray(inputs["mask_image"])[..., None] > 0
        np.testing.assert_array_equal(expected * ~mask, np.asarray(inputs["image"], np.int16) * ~mask)
        produced, expected = produced * mask, expected * mask
    assert np.abs(produced - expected).max() <= 1  # float32 rounding at a uint8 boundary at most


def test_command_quotes_prompts_and_keeps_flags_apart():
    settings = Settings("plms", 7, 4.5, seed=2**63, num_images=3, fast=True)
    for prompt in ("it's a \"cat\"; rm -rf /", "-a prompt that looks like a flag"):
        words = TextMode().command_words({"prompt": [prompt], "negative_prompt": ["blurry"]}, ".")
        line = generate_command("org/tiny", words, settings, "cpu")
        a = parse_generate_args(shlex.split(line)[2:])
        assert a.prompt == [prompt] and a.negative_prompt == "blurry" and a.model == "org/tiny"
        assert (a.scheduler, a.steps, a.guidance_scale, a.seed, a.batch, a.fast) == ("plms", 7, 4.5, 2**63, 3, True)


def test_widget_values_become_pipeline_inputs():
    # segmentation: a label map of class ids as background, or the legend's colours, and painted strokes on top
    label_map = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (4, 1)), mode="L")
    ids = ui.segmentation_inputs({"background": label_map, "layers": []}, 6)["segmentation_map"]
    np.testing.assert_array_equal(ids, np.tile(np.arange(4), (4, 1)))
    colors = ui.class_colors(6)
    assert len(set(colors)) == 6
    picture = Image.fromarray(np.array([[colors[2], colors[4]], [colors[0], colors[5]]], np.uint8))
    stroke = painted(2, (1, 1, 2, 2), colors[1])
    ids = ui.segmentation_inputs({"background": picture, "layers": [stroke]}, 6)["segmentation_map"]
    np.testing.assert_array_equal(ids, [[2, 4], [0, 1]])
    # inpainting: whatever is drawn, in any layer, is the mask; the image is the background in RGB
    out = ui.inpainting_inputs({"background": gradient(8, 8).convert("RGBA"), "layers": [painted(8, (2, 2, 4, 6))]})
    assert out["image"].mode == "RGB" and out["mask_image"].mode == "L"
    np.testing.assert_array_equal(np.asarray(out["mask_image"]) > 0, np.asarray(painted(8, (2, 2, 4, 6)))[..., 3] > 0)
    # layouts: empty rows skipped, numbers as the table gives them (strings, NaN for an empty cell)
    assert ui.layout_rows([["2", "0", "0.25", "1", 0.5], [float("nan")] * 5, []]) == [(2, (0.0, 0.25, 1.0, 0.5))]
    preview = np.asarray(ui.layout_preview([[3, 0.5, 0.5, 1.0, 1.0], [1, 0.1, 0.1, 0.2]], (32, 32), 5, scale=4))
    assert preview.shape == (128, 128, 3) and tuple(preview[-1, -1]) == ui.class_colors(5)[3]  # the box's corner
    assert (preview[:60, :60] == 255).all()  # the incomplete row is not drawn: the canvas stays white there


@pytest.mark.parametrize("call,message", [
    (lambda: ui.text_inputs("  ", "blurry"), "Type a prompt"),
    (lambda: ui.class_inputs(None), "Pick a class"),
    (lambda: ui.super_resolution_inputs(None), "Upload a low-resolution image"),
    (lambda: ui.inpainting_inputs(None), "Upload an image to inpaint"),
    (lambda: ui.inpainting_inputs({"background": gradient(8, 8), "layers": []}), "Draw a mask first"),
    (lambda: ui.inpainting_inputs({"background": gradient(8, 8), "layers": [Image.new("RGBA", (8, 8))]}),
     "Draw a mask first"),
    (lambda: ui.inpainting_inputs({"background": gradient(8, 8), "layers": [painted(4, (0, 0, 2, 2))]}),
     "mask layer is 4x4 but the image is 8x8"),
    (lambda: ui.segmentation_inputs(None, 6), "Upload or draw a segmentation map"),
    (lambda: ui.layout_inputs([[None] * 5]), "Add at least one box"),
    (lambda: ui.layout_inputs([[1, 0.1, None, 0.5, 0.5]]), "row 1: fill in all of class, x0, y0, x1, y1"),
    (lambda: ui.layout_inputs([[None] * 5, [1.5, 0, 0, 1, 1]]), "row 2: the class is a whole number"),
    (lambda: ui.layout_inputs([["one", 0, 0, 1, 1]]), "'one' is not a number"),
    (lambda: ui.layout_inputs([[1, 0, 0, "inf", 1]]), "'inf' is not a finite number"),
])
def test_bad_widget_values_give_messages(call, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        call()


@pytest.mark.parametrize("mode,values,message", [
    ("inpainting", lambda: [{"background": gradient(30, 30), "layers": []}], "Draw a mask first"),
    ("super_resolution", lambda: [None], "Upload a low-resolution image first"),
    ("layout", lambda: [[[9, 0.1, 0.1, 0.5, 0.5]]], "Unknown layout class id 9: this model knows 0..4"),
    ("layout", lambda: [[[1, 0.6, 0.1, 0.5, 0.5]]], "0 <= x0 <= x1 <= 1"),
])
def test_the_app_shows_bad_inputs_as_messages(mode, values, message):
    """The click handler turns the demo's and the pipeline's refusals into ``gr.Error`` (a message in the page)."""
    demo = build_demo(demo_pipe(mode), "org/tiny")
    generate = next(f.fn for f in demo.fns.values() if f.name == "generate")
    with pytest.raises(gr.Error, match=message) as err:
        generate("ddim", 2, 1.0, 0, False, 1, False, *values())
    assert "Traceback" not in err.value.message


@pytest.fixture(scope="module")
def text_server():
    """The tiny text model's demo, served on a free port for the whole module; yields (url, pipe)."""
    from helpers.local_hub import free_port

    pipe = demo_pipe("text")
    demo = build_demo(pipe, "org/tiny")
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True, ssr_mode=False)
    yield demo.local_url, pipe
    demo.close()


def test_a_second_request_waits_for_the_first(text_server):
    """Two requests at once over HTTP: both get their images, and the UNet never runs for both at the same time."""
    from gradio_client import Client

    url, pipe = text_server
    active, most, lock = [0], [0], threading.Lock()

    def enter(module, args):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.02)  # long enough for the requests to overlap were they not queued

    def leave(module, args, output):
        with lock:
            active[0] -= 1

    hooks = [pipe.unet.register_forward_pre_hook(enter), pipe.unet.register_forward_hook(leave)]
    try:
        client = Client(url, verbose=False)
        jobs = [client.submit("ddim", 15, 2.0, seed, False, 1, False, f"an emoji of {seed}", "", api_name="/generate")
                for seed in (1, 2)]
        results = [job.result(timeout=120) for job in jobs]
    finally:
        for hook in hooks:
            hook.remove()
    assert most[0] == 1
    for seed, (gallery, command, parameters, _, used_seed) in zip((1, 2), results):
        assert len(gallery) == 1 and Image.open(gallery[0]["image"]).size == (32, 32)
        assert used_seed == seed == parameters["seed"] and f"--seed {seed} " in command


def test_random_seed_is_drawn_and_reported(text_server):
    from gradio_client import Client

    client = Client(text_server[0], verbose=False)
    seeds = {client.predict("ddim", 1, 1.0, 0, True, 1, False, "a cat", "", api_name="/generate")[4] for _ in range(2)}
    assert len(seeds) == 2 and all(0 <= s < 2**32 for s in seeds)
    with pytest.raises(Exception, match="Type a prompt first"):
        client.predict("ddim", 1, 1.0, 0, True, 1, False, "", "", api_name="/generate")


def test_demo_command_line(monkeypatch, tmp_path, capsys):
    launched = {}
    monkeypatch.setattr("ldm_diffusers.demo.app.launch_demo", lambda *args: launched.setdefault("args", args))
    main(["demo", "--port", "7861", "--share"])
    assert launched["args"] == ("builtin:emoji-text-to-image", "cpu", 7861, True)
    with pytest.raises(SystemExit):
        main(["demo", "--model", str(tmp_path / "missing")])
    assert "no such folder" in capsys.readouterr().err
    make_pipe("class").save_pretrained(tmp_path / "local")
    with pytest.raises(SystemExit):
        main(["demo", "--model", str(tmp_path / "local"), "--push_space", "org/space"])
    assert "A Space cannot load" in capsys.readouterr().err


def _space_files(writable_hub, space_id: str) -> set[str]:
    import subprocess

    return set(subprocess.run(["git", "ls-tree", "-r", "--name-only", "main"], check=True, capture_output=True,
                              text=True, cwd=writable_hub.hub.repo_path(space_id, "spaces")).stdout.split())


def test_push_to_hub_with_a_space_that_runs_the_demo(writable_hub, tmp_path, monkeypatch, capsys):
    """The model and its Space go to the test Hub; the Space's app.py, pulled back from olah and run, serves the
    demo of the pulled model. ``ldm-diffusers demo --push_space`` pushes a Space for a model already there."""
    import runpy

    from huggingface_hub import SpaceCard, hf_hub_download

    from ldm_diffusers.hub import push_space

    pipe = demo_pipe("class")
    pipe.push_to_hub("org/demo-ldm")
    push_space("org/demo-ldm-demo", "org/demo-ldm")
    assert _space_files(writable_hub, "org/demo-ldm-demo") == {".gitattributes", "app.py", "requirements.txt",
                                                               "README.md"}
    assert writable_hub.validated[-1] == ([], [])  # the Space metadata passed the Hub's checks on upload
    main(["demo", "--model", "org/demo-ldm", "--push_space", "org/cli-space"])
    assert "org/cli-space" in capsys.readouterr().out
    assert "app.py" in _space_files(writable_hub, "org/cli-space")

    point_huggingface_hub_at(writable_hub.hub.endpoint, tmp_path / "pull", monkeypatch)
    card = SpaceCard.load("org/demo-ldm-demo", repo_type="space")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.models == ["org/demo-ldm"]
    app = hf_hub_download("org/demo-ldm-demo", "app.py", repo_type="space")
    requirements = Path(hf_hub_download("org/demo-ldm-demo", "requirements.txt", repo_type="space")).read_text()
    assert requirements.startswith("ldm-diffusers[demo]==")
    space = runpy.run_path(app, run_name="space")  # not __main__: builds the demo without serving it
    assert isinstance(space["demo"], gr.Blocks) and space["MODEL"] == "org/demo-ldm"
    assert component_ids(space["demo"])["class"].choices == [(f"class {i}", i) for i in range(5)]


def test_examples_app_is_the_space_app_of_the_builtin_model():
    from ldm_diffusers.hub import space_files

    example = REPO / "examples" / "app.py"
    assert example.read_text() == space_files("builtin:emoji-text-to-image")["app.py"]
    with pytest.raises(ValueError, match="A Space cannot load"):
        space_files("./outputs/ldm")


def test_a_large_upload_is_sampled_in_windows_with_progress_over_windows_and_steps():
    """A 24 x 24 low-resolution upload for a super-resolution model trained on 8 x 8 latents: 5 x 5 windows for
    each of 2 steps and the decode, progress reported after every model call and ending at 25 x 3."""
    pipe = demo_pipe("super_resolution")
    seen = []
    images = run(pipe, pipe.scheduler, {"image": gradient(24, 24)}, Settings("ddim", 2), lambda d, t: seen.append((d, t)))
    assert images[0].size == (96, 96)
    assert seen[-1] == (75, 75) and all(t == 75 for _, t in seen) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(seen) == 3 * 7  # 25 windows, 4 per call: 7 calls per pass
    small = run(pipe, pipe.scheduler, {"image": gradient(8, 8)}, Settings("ddim", 2), lambda d, t: seen.append((d, t)))
    assert small[0].size == (32, 32) and seen[-2:] == [(1, 2), (2, 2)]  # one window: progress per step
