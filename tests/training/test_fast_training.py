"""The training speed switches: ``--compile`` (one graph per compiled module, no graph breaks, no recompiles
across steps, the same losses as eager), ``--adam_implementation`` and ``--channels_last`` (the same training)."""

import json

import numpy as np
import pytest
import torch
from helpers.training import read_log, stage2_args

from ldm_diffusers.training.latent_diffusion import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# one UNet level with a transformer block: every kind of layer, half the graph to compile
ONE_LEVEL = ["--unet_channel_multipliers", "1", "--unet_attention_levels", "0"]


def losses(out):
    return np.array([r["loss"] for r in read_log(out)])


@pytest.fixture(scope="module")
def eager_run(stage1, emoji16_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("eager") / "run"
    main(stage2_args(stage1, emoji16_tiny, out, "--max_train_steps", "6", "--adam_implementation", "foreach",
                   *ONE_LEVEL))
    return out


def test_compiled_training_is_one_graph_without_recompiles_and_trains_as_eager(stage1, emoji16_tiny, eager_run,
                                                                              tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / "compiled"
    summary = main(stage2_args(stage1, emoji16_tiny, out, "--max_train_steps", "6", "--adam_implementation", "foreach",
                             "--compile", "--cache_latents", *ONE_LEVEL))
    # from the latent cache only the UNet runs every step: one training graph, compiled once (a recompile at
    # any of the 6 steps would add a graph, a graph break would split it)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert summary["compiled"] and summary["first_step_seconds"] > 0
    # same data, same draws (the cache holds the posterior's moments, sampled with the same noise as on
    # pixels): the same losses up to float32 reordering in the compiled kernels
    np.testing.assert_allclose(losses(out), losses(eager_run), rtol=2e-3)
    saved = json.loads((out / "unet" / "config.json").read_text())
    assert saved["_class_name"] == "LDMUNet2DConditionModel"  # the saved pipeline holds a plain (eager) UNet


@pytest.mark.parametrize("flags", [["--adam_implementation", "fused"], ["--adam_implementation", "for-loop"],
                                   ["--adam_implementation", "foreach", "--channels_last"]])
def test_optimiser_kernels_and_channels_last_train_the_same(stage1, emoji16_tiny, eager_run, tmp_path, flags):
    out = tmp_path / "run"
    main(stage2_args(stage1, emoji16_tiny, out, "--max_train_steps", "6", *flags, *ONE_LEVEL))
    np.testing.assert_allclose(losses(out), losses(eager_run), rtol=2e-3)


def test_accelerate_launch_one_thread_default_gets_the_cores_share(monkeypatch):
    """``accelerate launch`` without ``--cpu`` sets OMP_NUM_THREADS=1 for every process; a CPU run then takes its
    share of the cores (all of them for one process), unless --num_cpu_threads says otherwise; a plain run is left
    alone."""
    import os
    from types import SimpleNamespace

    from ldm_diffusers.training.loop import set_cpu_threads

    before = torch.get_num_threads()
    cpu = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        torch.set_num_threads(1)
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
        set_cpu_threads(cpu, None)  # not launched by accelerate: as the user set it
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        set_cpu_threads(cpu, None)
        assert torch.get_num_threads() == 4
        torch.set_num_threads(1)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        set_cpu_threads(cpu, None)  # two processes on the machine: two cores each
        assert torch.get_num_threads() == 2
        set_cpu_threads(cpu, 1)  # asked for
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
