"""``LDMPipeline.enable_fast_sampling``: the same images as eager, one compilation per shape, no graph breaks.

Speed is measured in benchmarks/bench_sampling.py, not here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.models import make_pipe
from helpers.paths import REPO


@pytest.fixture(scope="module")
def compiled():
    """A tiny class-conditional pipeline (KL first stage) with fast sampling on, and its eager twin's images."""
    torch._dynamo.reset()
    pipe = make_pipe("class", "kl")
    kwargs = dict(class_labels=[1, 3], num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    eager = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.enable_fast_sampling()
    return pipe, kwargs, eager


def test_fast_sampling_gives_the_eager_images_and_compiles_once_per_shape(compiled):
    from torch._dynamo.utils import counters

    pipe, kwargs, eager = compiled
    fast = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (fast - eager).abs().max().item() <= 1e-4  # the fp32 bound; float32 reordering gives ~1e-6
    assert set(pipe.fast_sampling.compile_seconds) == {"unet (4, 3, 8, 8)", "decode (2, 3, 8, 8)"}
    graphs = counters["stats"]["unique_graphs"]
    again = pipe(**dict(kwargs, num_inference_steps=5), generator=torch.Generator().manual_seed(1)).images
    assert counters["stats"]["unique_graphs"] == graphs  # other steps and seeds, same shapes: nothing recompiled
    assert not torch.equal(again, fast)
    assert not counters["graph_break"]  # fullgraph=True would raise; nothing fell back either


def test_a_new_shape_compiles_once_and_disable_goes_back_to_eager(compiled):
    pipe, kwargs, eager = compiled
    pipe(**dict(kwargs, class_labels=[2], output_type="latent"), generator=torch.Generator().manual_seed(0))
    assert "unet (2, 3, 8, 8)" in pipe.fast_sampling.compile_seconds
    pipe.disable_fast_sampling()
    assert pipe.fast_sampling is None
    assert torch.equal(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images, eager)
    pipe.enable_fast_sampling()


def openvino_check(cache: str, folder: str) -> None:
    """The OpenVINO backend on a tiny pipeline, and ``generate --fast`` choosing it (run in a subprocess by the test
    below, as OpenVINO's thread pool must not see the test process fork DataLoader workers later)."""
    import contextlib
    import io

    import numpy as np
    from PIL import Image

    from ldm_diffusers.cli import main

    pipe = make_pipe("class", "kl")
    kwargs = dict(class_labels=[1, 3], num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    eager = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.enable_fast_sampling(backend="openvino")
    fast = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (fast - eager).abs().max().item() <= 1e-4  # float32 inference precision, not the CPU's bf16 default
    assert set(pipe.fast_sampling.compile_seconds) == {"unet (4, 3, 8, 8)", "decode (2, 3, 8, 8)"}
    pipe(**dict(kwargs, num_inference_steps=5), generator=torch.Generator().manual_seed(1))
    assert len(pipe.fast_sampling.unet._compiled) == 1  # every step and call of one shape: one converted graph
    assert any(Path(cache).iterdir())  # compiled blobs on disk, for later processes
    with pytest.raises(ValueError, match="backend must be one of"):
        pipe.enable_fast_sampling(backend="tensorrt")
    # the command line's --fast picks OpenVINO where it is installed (the test extra installs it) and says why
    pipe.save_pretrained(folder)
    command = ["generate", "--model", folder, "--class_labels", "0", "3", "--steps", "2"]
    main([*command, "--out", f"{folder}/eager.png"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main([*command, "--out", f"{folder}/fast.png", "--fast"])
    assert "fast sampling with openvino: OpenVINO is installed" in printed.getvalue()
    eager, fast = (np.asarray(Image.open(f"{folder}/{name}.png"), dtype=np.int16) for name in ("eager", "fast"))
    assert np.abs(eager - fast).max() <= 1  # compiled: the same image up to float32 rounding at a uint8 boundary


def test_openvino_backend_gives_the_eager_images_and_caches_its_graphs(tmp_path):
    # In a process of its own: once OpenVINO's TBB thread pool exists, a fork (a DataLoader's workers in a later
    # test) crashes the forking process (observed: SIGSEGV in the pytest process).
    cache = tmp_path / "ov-cache"
    env = {**os.environ, "LDM_DIFFUSERS_OPENVINO_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    code = f"import test_fast_sampling as t; t.openvino_check({str(cache)!r}, {str(tmp_path / 'class')!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_auto_backend_is_openvino_on_a_cpu_that_has_it_else_inductor(monkeypatch):
    import importlib.util

    from ldm_diffusers.pipelines import fast_sampling

    assert importlib.util.find_spec("openvino") is not None  # the test extra installs it
    assert fast_sampling.choose_backend(torch.device("cpu"))[0] == "openvino"
    assert fast_sampling.choose_backend(torch.device("cuda"))[0] == "inductor"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    backend, reason = fast_sampling.choose_backend(torch.device("cpu"))
    assert backend == "inductor" and "pip install 'ldm-diffusers[openvino]'" in reason
