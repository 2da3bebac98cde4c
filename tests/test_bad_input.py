"""Bad input never reaches deep inside torch (issue 12, item 4): property-based tests with hypothesis.

Every invalid ``LDMPipeline.__call__`` argument (wrong types, sizes that are not multiples of the autoencoder's f,
negative / NaN guidance, empty prompt lists, wrong step counts, bad masks, class ids and layouts, generator lists
of the wrong length, unknown output types, NaN latents), unknown samplers, missing model folders, and invalid
``generate`` / ``train`` / ``train-autoencoder`` flags raise ``ValueError`` / ``TypeError`` /
``FileNotFoundError`` (or argparse's exit) whose message names the argument, never an ``IndexError`` /
``RuntimeError`` / ``AssertionError`` / ``KeyError`` from inside a model. Valid arguments (the controls) still
sample. A NaN that appears during sampling is reported with its step (``FloatingPointError``).

Tiny models are built once per module; invalid calls fail before sampling, valid ones sample 1-2 steps at
16x16 or 32x32. Every hypothesis example increments ``EXAMPLES``; the total is written to the terminal when the
module finishes ("test_bad_input: N hypothesis examples in M tests", after pytest's summary line).
"""

import contextlib
import io
import logging
import math
import string
from collections import Counter

import numpy as np
import pytest
import torch
from helpers.models import concat_pipe, make_pipe, tiny_kl, tiny_unet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldm_diffusers import LayoutEncoder, LDMPipeline, ldm_scheduler, switch_sampler
from ldm_diffusers.cli import main as cli_main
from ldm_diffusers.cli import parse_generate_args
from ldm_diffusers.pipelines.pipeline_ldm import NonFiniteWatch
from ldm_diffusers.schedulers import SAMPLERS
from ldm_diffusers.training import autoencoder as ae_training
from ldm_diffusers.training import latent_diffusion as ldm_training
from ldm_diffusers.utils.arguments import LR_SCHEDULERS

EXAMPLES: Counter = Counter()
CLEAN = (ValueError, TypeError, FileNotFoundError)


def examples(n: int):
    """Deterministic hypothesis settings; the autouse seeding fixture in conftest is function-scoped, which is
    harmless here (every example seeds its own generator)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def count(name: str) -> None:
    EXAMPLES[name] += 1


@pytest.fixture(scope="module", autouse=True)
def _module_setup(request):
    # One intra-op thread for these tiny models: on a busy 2-core machine two threads made this module ~4x slower
    # (thread hand-offs around kernels of a few microseconds); restored for the modules that follow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    line = f"test_bad_input: {sum(EXAMPLES.values())} hypothesis examples in {len(EXAMPLES)} tests"
    if reporter is None:
        print(line)
    else:  # after pytest's own summary, when its output capture has ended
        request.config.add_cleanup(lambda: reporter.write_line(line))


# -- the tiny pipelines, built once -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipes():
    torch.manual_seed(0)
    layout = LDMPipeline(vae=tiny_kl(4, latent_channels=3), unet=tiny_unet(context_dim=16),
                         scheduler=ldm_scheduler("ddim", "class"),
                         layout_encoder=LayoutEncoder(num_classes=5, context_dim=16, max_objects=4, depth=1, num_heads=2))
    layout.set_progress_bar_config(disable=True)
    return {"text": make_pipe("prompt"), "class": make_pipe("class"), "unconditional": make_pipe("unconditional"),
            "layout": layout, "sr": concat_pipe(3), "inpaint": concat_pipe(4), "seg": concat_pipe(6)}


def assert_clean(call, *names, types=CLEAN):
    """``call()`` raises one of ``types`` whose message names one of ``names``; returns the message."""
    try:
        call()
    except types as err:
        message = str(err)
        assert any(name in message for name in names), f"{type(err).__name__} does not name {names}: {message}"
        return message
    except Exception as err:  # noqa: BLE001 - an error from deep inside a model is the failure under test
        pytest.fail(f"expected {[t.__name__ for t in types]} naming {names}, got {type(err).__name__}: {err}")
    pytest.fail(f"no error; expected one naming {names}")


def fast(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 1)
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(**kwargs).images


# -- strategies of wrong values ---------------------------------------------------------------------------------
nan_or_inf = st.sampled_from([math.nan, math.inf, -math.inf])
not_a_number = st.one_of(st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=2), st.booleans(),
                         st.just(torch.tensor(1.0)), st.complex_numbers(allow_nan=False, allow_infinity=False, min_magnitude=1))
not_an_int = st.one_of(not_a_number.filter(lambda v: v is not None), st.floats(allow_nan=True, allow_infinity=True))


# -- __call__: scalars ----------------------------------------------------------------------------------------
@examples(40)
@given(name=st.sampled_from(["height", "width"]),
       value=st.one_of(st.integers(-64, 64).filter(lambda v: v % 4 or v <= 0), st.integers(65, 10**6).filter(lambda v: v % 4),
                       not_an_int))
def test_sizes_must_be_positive_multiples_of_f(pipes, name, value):
    count("sizes")
    assert_clean(lambda: fast(pipes["class"], class_labels=[1], **{name: value}), name)


@examples(30)
@given(value=st.one_of(st.integers(max_value=0), st.integers(1001, 10**12), not_an_int),  # DDPM takes 1000
       sampler=st.sampled_from(sorted(SAMPLERS)))
def test_num_inference_steps_must_be_an_int_the_sampler_can_take(pipes, value, sampler):
    count("steps")
    pipe = pipes["class"]
    original = pipe.scheduler
    pipe.scheduler = switch_sampler(original, sampler)
    try:
        message = assert_clean(lambda: fast(pipe, class_labels=[1], num_inference_steps=value), "num_inference_steps")
        assert "1.." in message  # the allowed range
    finally:
        pipe.scheduler = original


@examples(40)
@given(name=st.sampled_from(["guidance_scale", "eta"]),
       value=st.one_of(st.floats(max_value=-1e-9, allow_infinity=True), st.integers(max_value=-1), nan_or_inf,
                       not_a_number))
def test_guidance_scale_and_eta_must_be_finite_and_non_negative(pipes, name, value):
    count("guidance")
    message = assert_clean(lambda: fast(pipes["text"], prompt="a cat", **{name: value}), name)
    assert ">= 0" in message


@examples(25)
@given(name=st.sampled_from(["num_images_per_prompt", "batch_size"]),
       value=st.one_of(st.integers(max_value=0), not_an_int))
def test_batch_counts_must_be_positive_ints(pipes, name, value):
    count("batch")
    assert_clean(lambda: fast(pipes["unconditional"], **{name: value}), name)


@examples(20)
@given(value=st.one_of(st.text(max_size=8).filter(lambda s: s not in ("pil", "np", "pt", "latent")), not_a_number,
                       st.sampled_from(["PIL", "numpy", "torch", "latents", "jpeg"])))
def test_unknown_output_type_lists_the_allowed_ones(pipes, value):
    count("output_type")
    message = assert_clean(lambda: fast(pipes["class"], class_labels=[0], output_type=value), "output_type")
    assert "'latent'" in message


# -- __call__: prompts ------------------------------------------------------------------------------------------
bad_prompt = st.one_of(
    st.just([]),
    st.lists(st.one_of(st.integers(), st.none(), st.floats(), st.binary(max_size=3)), min_size=1, max_size=3),
    st.lists(st.text(max_size=5), min_size=1, max_size=2).map(lambda p: [*p, 7]),
    st.integers(), st.floats(), st.binary(max_size=4), st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2),
)


@examples(40)
@given(name=st.sampled_from(["prompt", "negative_prompt"]), value=bad_prompt)
def test_prompts_are_strings_or_non_empty_lists_of_strings(pipes, name, value):
    count("prompt")
    kwargs = {"prompt": "an emoji of a cat", name: value}
    assert_clean(lambda: fast(pipes["text"], guidance_scale=2.0, **kwargs), name)


@examples(15)
@given(n=st.integers(1, 4), m=st.integers(1, 4))
def test_negative_prompt_count_must_match(pipes, n, m):
    count("negative_count")
    call = lambda: fast(pipes["text"], prompt=["a cat"] * n, negative_prompt=["blurry"] * m, guidance_scale=2.0)  # noqa: E731
    if n == m:
        assert call().shape == (n, 3, 8, 8)
    else:
        assert "negative_prompt" in assert_clean(call, "negative_prompt")


@contextlib.contextmanager
def captured_warnings(logger_name: str):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@examples(6)
@given(extra=st.integers(1, 300))
def test_long_prompts_are_truncated_with_a_warning(pipes, extra):
    count("long_prompt")
    words = ["cat", "dog", "red", "blue"]
    keep = [words[i % 4] for i in range(75)]  # 75 word pieces + [CLS] + [SEP] = the 77 tokens
    long = " ".join(keep + [words[(i * 7) % 4] for i in range(extra)])
    with captured_warnings("ldm_diffusers.conditioning.text") as records:
        out = fast(pipes["text"], prompt=long, output_type="np")
    assert any("truncated" in r.getMessage() and "prompt" in r.getMessage() for r in records)
    np.testing.assert_array_equal(out, fast(pipes["text"], prompt=" ".join(keep), output_type="np"))


# -- __call__: class labels, layouts -------------------------------------------------------------------------------
bad_labels = st.one_of(
    st.integers(max_value=-1), st.integers(min_value=6),  # 5 classes (0..4) + the null class 5
    st.lists(st.integers(0, 4), max_size=3).flatmap(lambda ok: st.integers(6, 10**30).map(lambda b: [*ok, b])),
    st.lists(st.integers(0, 4), max_size=3).map(lambda ok: [*ok, -1]),
    st.just([]), st.floats(), st.lists(st.floats(0, 4), min_size=1, max_size=3),
    st.just(torch.tensor([1.0])), st.just(torch.tensor([[1, 2]])), st.just(torch.tensor([True])),
    st.text(max_size=3), st.just(np.array([0.5])),
)


@examples(40)
@given(labels=bad_labels)
def test_class_labels_are_known_integer_ids(pipes, labels):
    count("class_labels")
    message = assert_clean(lambda: fast(pipes["class"], class_labels=labels), "class_labels")
    assert "0..4" in message


coordinate = st.floats(0, 1)
box = st.tuples(coordinate, coordinate, coordinate, coordinate).map(
    lambda b: (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])))
good_object = st.tuples(st.integers(0, 4), box)


def _inverted(b):
    x0, y0, x1, y1 = b
    return (x1, y0, x0, y1) if x0 != x1 else (x0, y1, x1, y0)


bad_object = st.one_of(
    st.tuples(st.one_of(st.integers(max_value=-1), st.integers(min_value=5)), box),  # unknown class id
    st.tuples(st.integers(0, 4), box.filter(lambda b: b[0] != b[2] or b[1] != b[3]).map(_inverted)),  # inverted box
    st.tuples(st.integers(0, 4), st.tuples(st.floats(1.0001, 1e6), coordinate, coordinate, coordinate)),
    st.tuples(st.integers(0, 4), st.tuples(coordinate, st.floats(-1e6, -1e-4), coordinate, coordinate)),
    st.tuples(st.integers(0, 4), st.tuples(nan_or_inf, coordinate, coordinate, coordinate)),
    st.tuples(st.integers(0, 4), st.lists(coordinate, max_size=3).map(tuple)),  # too few coordinates
    st.tuples(st.sampled_from([1.5, "2", None]), box),  # class ids are integers
)


@examples(40)
@given(before=st.lists(good_object, max_size=1), bad=bad_object, after=st.lists(good_object, max_size=1),
       batched=st.booleans())
def test_layouts_with_bad_boxes_or_classes(pipes, before, bad, after, batched):
    count("layout")
    layout = [*before, bad, *after]
    if batched:
        layout = [[(0, (0.0, 0.0, 1.0, 1.0))], layout]
    assert_clean(lambda: fast(pipes["layout"], layout=layout), "layout", "Layout")


@examples(10)
@given(value=st.one_of(st.just([]), st.integers(), st.text(max_size=3), st.just([5]),
                       st.lists(good_object, min_size=5, max_size=6)))  # 5+ objects: max_objects is 4
def test_layout_shape(pipes, value):
    count("layout_shape")
    assert_clean(lambda: fast(pipes["layout"], layout=value), "layout", "Layout")


# -- __call__: images, masks and segmentation maps ---------------------------------------------------------------
@examples(30)
@given(case=st.sampled_from(["range", "nan", "int", "channels", "ndim", "type", "empty_list"]),
       scale=st.floats(1.01, 100))
def test_super_resolution_image_checks(pipes, case, scale):
    count("sr_image")
    image = {
        "range": torch.linspace(-scale, scale, 48).reshape(1, 3, 4, 4),
        "nan": torch.full((1, 3, 4, 4), math.nan),
        "int": torch.ones(1, 3, 4, 4, dtype=torch.long),
        "channels": torch.zeros(1, 1 if scale < 50 else 4, 4, 4),
        "ndim": torch.zeros(4, 4),
        "type": "low-res.png",
        "empty_list": [],
    }[case]
    assert_clean(lambda: fast(pipes["sr"], image=image), "image")


@examples(40)
@given(case=st.sampled_from(["size", "range", "nan", "count", "image_size", "type"]),
       h=st.integers(1, 6).map(lambda k: 4 * k), w=st.integers(1, 6).map(lambda k: 4 * k),
       off=st.integers(1, 3), high=st.floats(1.001, 255))
def test_inpainting_mask_and_image_checks(pipes, case, h, w, off, high):
    count("inpaint")
    image, mask = torch.rand(2, 3, h, w) * 2 - 1, torch.zeros(2, 1, h, w)
    name = "mask_image"
    if case == "size":
        mask = torch.zeros(2, 1, h + off, w)
    elif case == "range":
        mask = torch.full((2, 1, h, w), high if off != 2 else -high + 1)
    elif case == "nan":
        mask[0, 0, 0, 0] = math.nan
    elif case == "count":
        mask = torch.zeros(2 + off, 1, h, w)
    elif case == "image_size":  # not a multiple of f: padded, sampled and cropped back
        image, mask = torch.zeros(1, 3, h + off, w), torch.zeros(1, 1, h + off, w)
        assert fast(pipes["inpaint"], image=image, mask_image=mask, output_type="np").shape == (1, h + off, w, 3)
        return
    else:
        mask = [[0, 1], [1, 0]]
    assert_clean(lambda: fast(pipes["inpaint"], image=image, mask_image=mask), name)


@examples(25)
@given(case=st.sampled_from(["high", "negative", "float", "size", "pil_rgb"]), value=st.integers(6, 255),
       off=st.integers(1, 3))
def test_segmentation_map_checks(pipes, case, value, off):
    count("segmentation")
    seg = torch.zeros(16, 16, dtype=torch.long)
    if case == "high":
        seg[3, 3] = value
    elif case == "negative":
        seg[3, 3] = -value
    elif case == "float":
        seg = seg.float() + 0.5
    elif case == "size":
        seg = torch.zeros(16 + off, 16, dtype=torch.long)
    else:
        seg = Image.new("RGB", (16, 16))
    assert_clean(lambda: fast(pipes["seg"], segmentation_map=seg), "segmentation_map")


# -- __call__: generator, latents, callbacks, missing components --------------------------------------------------
@examples(30)
@given(labels=st.integers(1, 3), per=st.integers(1, 2), extra=st.integers(-3, 3).filter(bool))
def test_generator_list_length_must_match_the_batch(pipes, labels, per, extra):
    count("generator")
    total = labels * per
    gens = [torch.Generator().manual_seed(i) for i in range(max(1, total + extra))]
    if len(gens) == total:
        return
    message = assert_clean(lambda: fast(pipes["class"], class_labels=list(range(labels)), num_images_per_prompt=per,
                                        generator=gens), "generator")
    assert str(total) in message


@examples(15)
@given(value=st.one_of(st.integers(), st.text(max_size=3), st.just([]), st.just([torch.Generator(), 3]),
                       st.just(np.random.default_rng(0))))
def test_generator_type(pipes, value):
    count("generator_type")
    assert_clean(lambda: fast(pipes["class"], class_labels=[0], generator=value), "generator")


@examples(25)
@given(case=st.sampled_from(["shape", "nan", "inf", "type"]), b=st.integers(1, 3), s=st.sampled_from([4, 6, 16]))
def test_latents_shape_and_values(pipes, case, b, s):
    count("latents")
    latents = {"shape": torch.randn(b + 1, 3, s, s), "nan": torch.full((1, 3, 8, 8), math.nan),
               "inf": torch.full((1, 3, 8, 8), math.inf), "type": np.zeros((1, 3, 8, 8))}[case]
    message = assert_clean(lambda: fast(pipes["class"], class_labels=[0], latents=latents), "latents")
    if case in ("nan", "inf"):
        assert case.replace("nan", "NaN") in message


@examples(10)
@given(names=st.one_of(st.lists(st.sampled_from(["eps", "prompt_embeds", "noise", "t"]), min_size=1, max_size=2),
                       st.just("latents"), st.integers()))
def test_callback_tensor_inputs(pipes, names):
    count("callback")
    assert_clean(lambda: fast(pipes["class"], class_labels=[0], callback_on_step_end=lambda *a: None,
                              callback_on_step_end_tensor_inputs=names), "callback_on_step_end_tensor_inputs")


def test_inputs_the_pipeline_has_no_component_for(pipes):
    assert_clean(lambda: fast(pipes["class"], prompt="a cat"), "prompt")
    assert_clean(lambda: fast(pipes["text"], class_labels=[1]), "class_labels")
    assert_clean(lambda: fast(pipes["text"], layout=[(1, (0, 0, 1, 1))]), "layout")
    assert_clean(lambda: fast(pipes["class"], negative_prompt="blurry", class_labels=[1]), "negative_prompt")
    assert_clean(lambda: fast(pipes["sr"], image=torch.zeros(1, 3, 4, 4), guidance_scale=2.0), "guidance_scale")


# -- the controls: valid arguments still sample ---------------------------------------------------------------------
@examples(15)
@given(mode=st.sampled_from(["class", "text", "unconditional", "layout"]), size=st.sampled_from([16, 32]),
       steps=st.integers(1, 2), guidance=st.floats(0, 4), n=st.integers(1, 2), per=st.integers(1, 2),
       gen_list=st.booleans(), data=st.data())
def test_valid_arguments_sample(pipes, mode, size, steps, guidance, n, per, gen_list, data):
    count("valid")
    kwargs = {
        "class": {"class_labels": data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))},
        "text": {"prompt": data.draw(st.lists(st.text(string.ascii_lowercase + " ", max_size=12), min_size=n, max_size=n))},
        "unconditional": {"batch_size": n},
        "layout": {"layout": data.draw(st.lists(st.lists(good_object, max_size=4), min_size=n, max_size=n))},
    }[mode]
    if mode == "unconditional":
        guidance = min(guidance, 1.0)
    total = n * per
    generator = [torch.Generator().manual_seed(i) for i in range(total)] if gen_list else torch.Generator().manual_seed(0)
    out = pipes[mode](**kwargs, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                      num_images_per_prompt=per, generator=generator, output_type="np").images
    assert out.shape == (total, size, size, 3) and np.isfinite(out).all()


@examples(8)
@given(case=st.sampled_from(["sr", "inpaint", "seg"]), h=st.sampled_from([8, 16]), w=st.sampled_from([8, 16]),
       b=st.integers(1, 2))
def test_valid_spatial_inputs_sample(pipes, case, h, w, b):
    count("valid_spatial")
    if case == "sr":
        out = fast(pipes["sr"], image=torch.rand(b, 3, h // 4, w // 4) * 2 - 1, output_type="np")
    elif case == "inpaint":
        mask = (torch.rand(b, 1, h, w) > 0.5).float()
        out = fast(pipes["inpaint"], image=torch.rand(b, 3, h, w), mask_image=mask, output_type="np")
    else:
        out = fast(pipes["seg"], segmentation_map=torch.randint(0, 6, (b, h, w)), output_type="np")
    assert out.shape == (b, h, w, 3) and np.isfinite(out).all()


# -- NaN during sampling: reported with its step -------------------------------------------------------------------
@examples(12)
@given(sampler=st.sampled_from(sorted(SAMPLERS)), steps=st.integers(2, 5), data=st.data(), guided=st.booleans())
def test_nan_from_the_unet_names_the_step(pipes, sampler, steps, data, guided):
    count("nan_step")
    pipe = pipes["class"]
    original = pipe.scheduler
    pipe.scheduler = switch_sampler(original, sampler)
    pipe.scheduler.set_timesteps(steps)
    total = len(pipe.scheduler.timesteps)  # PLMS takes one step more than asked
    k = data.draw(st.integers(0, total - 1))
    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) == k + 1:
            output.sample[0, 0, 0, 0] = math.nan
        return output

    hook = pipe.unet.register_forward_hook(poison)
    try:
        with pytest.raises(FloatingPointError) as info:
            fast(pipe, class_labels=[1], num_inference_steps=steps, guidance_scale=2.0 if guided else 1.0)
    finally:
        hook.remove()
        pipe.scheduler = original
    message = str(info.value)
    assert f"latents became NaN at step {k + 1} of {total} " in message, message
    assert len(calls) == k + 1  # sampling stopped there


def test_nan_from_a_callback_and_the_deferred_check():
    pipe = make_pipe("class")

    def callback(p, i, t, tensors):
        return {"latents": tensors["latents"] * math.inf} if i == 1 else None

    with pytest.raises(FloatingPointError, match=r"became inf at step 2 of 3 \(timestep"):
        fast(pipe, class_labels=[0], num_inference_steps=3, callback_on_step_end=callback)
    # the accelerator path: the first bad step is kept on the device and read once, after the loop
    timesteps = torch.tensor([900, 600, 300, 0])
    watch = NonFiniteWatch(timesteps, deferred=True)
    for i, value in enumerate([0.0, math.nan, 1.0, math.nan]):
        watch.check(torch.full((1, 3, 2, 2), value), i)
    with pytest.raises(FloatingPointError, match=r"at step 2 of 4 \(timestep 600\)"):
        watch.finish()
    clean = NonFiniteWatch(timesteps, deferred=True)
    clean.check(torch.zeros(1), 0)
    clean.finish()


def test_nan_in_the_encoded_condition_is_refused_before_sampling():
    pipe = make_pipe("class")
    pipe.class_embedder.embedding.weight.data[2] = math.nan
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    assert_clean(lambda: fast(pipe, class_labels=[2]), "class_labels")
    pipe.class_embedder.embedding.weight.data[2] = 0.0
    pipe.class_embedder.embedding.weight.data[5] = math.inf  # the null class: used by guidance only
    with pytest.raises(ValueError, match="null .* `class_labels`"):
        fast(pipe, class_labels=[2], guidance_scale=2.0)
    assert fast(pipe, class_labels=[2]).shape == (1, 3, 8, 8)  # without guidance the null row is never used
    assert len(calls) == 1


# -- schedulers and model folders --------------------------------------------------------------------------------
@examples(20)
@given(name=st.text(max_size=10).filter(lambda s: s not in SAMPLERS))
def test_unknown_samplers_list_the_known_ones(name):
    count("sampler")
    for call in (lambda: ldm_scheduler(name), lambda: switch_sampler(ldm_scheduler(), name)):
        message = assert_clean(call, "sampler")
        assert all(known in message for known in SAMPLERS)


@examples(10)
@given(name=st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12), nested=st.booleans())
def test_missing_model_folders(tmp_path_factory, name, nested):
    count("model_folder")
    root = tmp_path_factory.getbasetemp()
    path = root / "no-such-parent" / name if nested else root / name
    if path.exists():
        return
    message = assert_clean(lambda: LDMPipeline.from_pretrained(path), str(path), types=(FileNotFoundError,))
    assert "pretrained_model_name_or_path" in message
    err = cli_error(lambda: parse_generate_args(["a cat", "--model", str(path)]))
    assert "--model" in err and str(path) in err


# -- the command line ------------------------------------------------------------------------------------------
def cli_error(call) -> str:
    """Run a CLI parse that must fail; return what it printed to stderr plus the SystemExit message."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as info:
        call()
    code = info.value.code
    assert code not in (0, None)
    return stderr.getvalue() + ("" if isinstance(code, int) else str(code))


INT_TEXT = st.one_of(st.sampled_from(["", "abc", "1.5", "1e3", "nan", "0x10", "one", "2,0"]),
                     st.text(string.ascii_letters, min_size=1, max_size=5))
FLOAT_TEXT = st.one_of(st.sampled_from(["", "abc", "1,5", "e", "one"]), st.text(string.ascii_letters, min_size=1, max_size=5)
                       .filter(lambda s: s.lower() not in ("nan", "inf", "infinity")))
NON_FINITE = st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity"])
BAD = {
    "positive": st.one_of(st.integers(max_value=0).map(str), INT_TEXT),
    "non_negative": st.one_of(st.integers(max_value=-1).map(str), INT_TEXT),
    "positive_float": st.one_of(st.floats(max_value=0, allow_nan=False).map(repr), NON_FINITE, FLOAT_TEXT),
    "non_negative_float": st.one_of(st.floats(max_value=-1e-9, allow_nan=False).map(repr), NON_FINITE, FLOAT_TEXT),
    "probability": st.one_of(st.floats(1.0001, 1e9).map(repr), st.floats(max_value=-1e-9, allow_nan=False).map(repr),
                             NON_FINITE, FLOAT_TEXT),
    "beta": st.one_of(st.floats(1.0, 1e9).map(repr), st.floats(max_value=-1e-9, allow_nan=False).map(repr), NON_FINITE),
    "seed": st.one_of(st.integers(max_value=-1).map(str), st.integers(2**64, 2**70).map(str), INT_TEXT),
    "class_label": st.one_of(st.integers(max_value=-1).map(str), st.sampled_from(["", " ", "\t"])),  # other text: a name
}
GOOD = {
    "positive": st.integers(1, 10**6).map(str), "non_negative": st.integers(0, 10**6).map(str),
    "positive_float": st.floats(1e-9, 1e6).map(repr), "non_negative_float": st.floats(0, 1e6).map(repr),
    "probability": st.floats(0, 1).map(repr), "beta": st.floats(0, 0.999).map(repr), "seed": st.integers(0, 2**32 - 1).map(str),
}
GENERATE_FLAGS = {"--steps": "positive", "--batch": "positive", "--height": "positive", "--width": "positive",
                  "--guidance_scale": "non_negative_float", "--eta": "non_negative_float", "--seed": "seed",
                  "--class_labels": "class_label"}
TRAIN_FLAGS = {
    "--resolution": "positive", "--train_batch_size": "positive", "--max_train_steps": "positive",
    "--gradient_accumulation_steps": "positive", "--num_train_epochs": "positive", "--context_dim": "positive",
    "--unet_base_channels": "positive", "--unet_channel_multipliers": "positive", "--norm_num_groups": "positive",
    "--attention_head_dim": "positive", "--max_train_samples": "positive", "--checkpointing_steps": "positive",
    "--logging_steps": "positive", "--num_validation_images": "positive", "--validation_steps": "non_negative",
    "--lr_warmup_steps": "non_negative", "--dataloader_num_workers": "non_negative", "--evaluation_steps": "non_negative",
    "--learning_rate": "positive_float", "--adam_epsilon": "positive_float", "--max_grad_norm": "positive_float",
    "--snr_gamma": "positive_float", "--noise_offset": "non_negative_float", "--adam_weight_decay": "non_negative_float",
    "--validation_guidance_scale": "non_negative_float", "--ema_decay": "probability", "--adam_beta1": "beta",
    "--adam_beta2": "beta", "--seed": "seed", "--validation_class_labels": "non_negative",
}
AUTOENCODER_FLAGS = {
    "--resolution": "positive", "--base_channels": "positive", "--latent_channels": "positive",
    "--layers_per_block": "positive", "--norm_num_groups": "positive", "--train_batch_size": "positive",
    "--max_train_steps": "positive", "--disc_layers": "positive", "--disc_channels": "positive",
    "--scaling_factor_samples": "positive", "--disc_start": "non_negative", "--validation_steps": "non_negative",
    "--learning_rate": "positive_float", "--max_grad_norm": "positive_float", "--kl_weight": "non_negative_float",
    "--perceptual_weight": "non_negative_float", "--disc_weight": "non_negative_float", "--validation_fraction": "beta",
    "--ema_decay": "probability", "--adam_beta1": "beta", "--seed": "seed",
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input-models")
    make_pipe("class").save_pretrained(root / "class")
    tiny_kl(4, latent_channels=3).save_pretrained(root / "vae")
    return root


def _flag_strategy(flags: dict, table: dict):
    return st.sampled_from(sorted(flags)).flatmap(lambda flag: st.tuples(st.just(flag), table[flags[flag]]))


def _assert_names(err: str, flag: str) -> None:
    assert flag in err, err
    assert "must be" in err or "choose from" in err or "invalid" in err, err


@examples(60)
@given(case=_flag_strategy(GENERATE_FLAGS, BAD))
def test_generate_refuses_bad_flag_values(case):
    count("generate_flags")
    flag, value = case
    _assert_names(cli_error(lambda: parse_generate_args(["a cat", f"{flag}={value}"])), flag)


@examples(20)
@given(case=_flag_strategy({k: v for k, v in GENERATE_FLAGS.items() if k != "--class_labels"}, GOOD))
def test_generate_accepts_good_flag_values(case):
    count("generate_flags_valid")
    flag, value = case
    parsed = getattr(parse_generate_args(["a cat", f"{flag}={value}"]), flag[2:])
    assert parsed == (float(value) if "." in value or "e" in value else int(value))


@examples(15)
@given(case=st.one_of(
    st.tuples(st.just("--scheduler"), st.text(max_size=8).filter(lambda s: s not in SAMPLERS and s != "model")),
    st.tuples(st.just("--device"), st.sampled_from(["gpu", "cuda:x", "tpu", "", "cpu:zero", "meta"])),
    st.tuples(st.just("--out"), st.sampled_from(["grid.xyz", "grid", "out.", "no-such-dir/x.png"])),
))
def test_generate_refuses_unknown_choices_devices_and_outputs(case):
    count("generate_choices")
    flag, value = case
    err = cli_error(lambda: parse_generate_args(["a cat", f"{flag}={value}"]))
    assert flag in err, err


@examples(8)
@given(case=st.one_of(
    st.tuples(st.just("--height"), st.integers(1, 100).filter(lambda v: v % 4).map(str)),
    st.tuples(st.just("--width"), st.integers(1, 100).filter(lambda v: v % 4).map(str)),
    st.tuples(st.just("--class_labels"), st.integers(5, 10**6).map(str)),
    st.tuples(st.just("--steps"), st.integers(1000, 10**6).map(str)),
))
def test_generate_checks_flags_against_the_model(model_dirs, tmp_path_factory, case):
    count("generate_model_flags")
    flag, value = case
    out = tmp_path_factory.getbasetemp() / "never-written.png"
    argv = ["generate", "--model", str(model_dirs / "class"), "--out", str(out), "--steps", "1"]
    argv += [] if flag == "--class_labels" else ["--class_labels", "1"]
    err = cli_error(lambda: cli_main([*argv, f"{flag}={value}"]))
    assert flag in err and not out.exists(), err


def test_generate_combinations(model_dirs, tmp_path):
    model = ["--model", str(model_dirs / "class"), "--steps", "1", "--out", str(tmp_path / "x.png")]
    assert "one conditioning input" in cli_error(lambda: cli_main(["generate", "a cat", *model, "--class_labels", "1"]))
    assert "--negative_prompt" in cli_error(lambda: cli_main(["generate", *model, "--negative_prompt", "x"]))
    assert "text_encoder" in cli_error(lambda: cli_main(["generate", "a cat", *model]))
    assert "class_labels" in cli_error(lambda: cli_main(["generate", *model]))  # a conditional model, no condition


@examples(60)
@given(case=_flag_strategy(TRAIN_FLAGS, BAD))
def test_train_refuses_bad_flag_values(model_dirs, case):
    count("train_flags")
    flag, value = case
    argv = ["--pretrained_vae_model_name_or_path", str(model_dirs / "vae"), f"{flag}={value}"]
    _assert_names(cli_error(lambda: ldm_training.parse_args(argv)), flag)


@examples(20)
@given(case=_flag_strategy({k: v for k, v in TRAIN_FLAGS.items() if k not in (
    "--resolution", "--unet_base_channels", "--unet_channel_multipliers", "--norm_num_groups", "--attention_head_dim",
    "--context_dim")}, GOOD))
def test_train_accepts_good_flag_values(model_dirs, case):
    count("train_flags_valid")
    flag, value = case
    args = ldm_training.parse_args(["--pretrained_vae_model_name_or_path", str(model_dirs / "vae"), f"{flag}={value}"])
    parsed = getattr(args, flag[2:])
    parsed = parsed[0] if isinstance(parsed, list) else parsed
    assert parsed == (float(value) if "." in value or "e" in value else int(value))


@examples(25)
@given(case=st.one_of(
    st.tuples(st.just("--norm_num_groups"), st.sampled_from(["3", "5", "7", "48", "128"])),
    st.tuples(st.just("--attention_head_dim"), st.sampled_from(["3", "5", "48", "256"])),
    st.tuples(st.just("--unet_attention_levels"), st.integers(3, 100).map(str)),
    st.tuples(st.just("--text_encoder_heads"), st.sampled_from(["3", "5", "7", "300"])),
    st.tuples(st.just("--lr_scheduler"), st.text(max_size=8).filter(lambda s: s not in LR_SCHEDULERS)),
    st.tuples(st.just("--conditioning"), st.sampled_from(["txt", "classes", "none", "depth"])),
    st.tuples(st.just("--resolution"), st.integers(1, 200).filter(lambda v: v % 4).map(str)),
    st.tuples(st.just("--pretrained_vae_model_name_or_path"), st.sampled_from(["/no/such/vae", "./missing-vae"])),
))
def test_train_cross_flag_checks(model_dirs, case):
    count("train_cross")
    flag, value = case
    argv = ["--pretrained_vae_model_name_or_path", str(model_dirs / "vae"), f"{flag}={value}"]
    err = cli_error(lambda: ldm_training.parse_args(argv))
    assert flag in err, err


@examples(50)
@given(case=_flag_strategy(AUTOENCODER_FLAGS, BAD))
def test_train_autoencoder_refuses_bad_flag_values(case):
    count("autoencoder_flags")
    flag, value = case
    _assert_names(cli_error(lambda: ae_training.parse_args([f"{flag}={value}"])), flag)


@examples(15)
@given(case=st.one_of(
    st.tuples(st.just("--downsampling_factor"), st.sampled_from(["0", "3", "5", "6", "64", "-4"])),
    st.tuples(st.just("--channel_multipliers"), st.lists(st.integers(1, 4).map(str), min_size=1, max_size=6)
              .filter(lambda m: len(m) != 3)),  # -f 4 needs 3
    st.tuples(st.just("--norm_num_groups"), st.sampled_from(["3", "5", "7", "64"])),
    st.tuples(st.just("--perceptual_loss"), st.just("lpips")),
    st.tuples(st.just("--lr_scheduler"), st.sampled_from(["cosine_annealing", "step", "Constant"])),
    st.tuples(st.just("--pretrained_model_name_or_path"), st.just("/no/such/autoencoder")),
))
def test_train_autoencoder_cross_flag_checks(case):
    count("autoencoder_cross")
    flag, value = case
    values = value if isinstance(value, list) else [value]
    err = cli_error(lambda: ae_training.parse_args([flag, *values]))
    assert flag in err, err
