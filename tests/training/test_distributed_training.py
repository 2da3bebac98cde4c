"""FSDP (FULL_SHARD) training for real: the stage-2 script on 2 CPU processes over gloo, launched with the shipped
``examples/accelerate_configs/fsdp_full_shard.yaml`` (FSDP2), with ``--use_ema``.

torch 2.13's FSDP (FSDP1 given ``device_id=cpu``, and FSDP2) runs on CPU tensors over gloo, but accelerate 1.x
applies an FSDP launch config only on accelerator devices: with ``ACCELERATE_USE_CPU`` it silently runs DDP. The
launcher written by :func:`_fsdp_launcher` lifts that one gate (the distributed type accelerate would have set on a
GPU, and the device ``cpu`` instead of ``cpu:0``, which FSDP1 rejects as a mismatch), then runs the training script
unchanged; everything else (wrapping, sharded checkpoints, the FSDP optimiser state) is accelerate's and torch's
own code. The same runs prove DDP equal to one process. Everything trains in float64, so that the tolerances are
bounds and not guesses (see the tests' docstrings).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import REPO
from helpers.scripts import reset_accelerate_state
from safetensors.torch import load_file

from ldm_diffusers.training.latent_diffusion import main as train_main

pytestmark = pytest.mark.slow
TRAIN_SCRIPT = REPO / "examples" / "train_text_to_image.py"
FSDP_CONFIG = REPO / "examples" / "accelerate_configs" / "fsdp_full_shard.yaml"

LAUNCHER = '''import runpy, sys, torch
torch.set_default_dtype(torch.float64)  # every model is built / loaded in float64
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def __init__(self, *args, **kwargs):  # accelerate applies FSDP on accelerators only: lift that gate on CPUs
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = plugin
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.device = PartialState._shared_state["device"] = torch.device("cpu")  # FSDP1: "cpu:0" != "cpu"


AcceleratorState.__init__ = __init__
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def tiny_args(stage1, data_dir, out, *extra):
    """The tiny text-to-image model of training/test_train_latent_diffusion.py, 2 images per process and step."""
    return [
        "--pretrained_vae_model_name_or_path", str(stage1), "--train_data_dir", str(data_dir), "--resolution", "16",
        "--output_dir", str(out), "--unet_base_channels", "16", "--unet_channel_multipliers", "1", "2",
        "--norm_num_groups", "8", "--attention_head_dim", "8", "--context_dim", "32", "--text_encoder_layers", "1",
        "--text_encoder_heads", "2", "--max_prompt_length", "8", "--train_batch_size", "2", "--max_train_samples", "8",
        "--logging_steps", "1", "--seed", "3", "--num_validation_images", "1", "--validation_inference_steps", "1",
        "--validation_steps", "0", "--report_to", "none", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--conditioning_dropout_prob", "0.2", "--use_ema", "--ema_decay", "0.9", *extra,
    ]


def _launch(launcher: Path, args, *accelerate_args, processes: int = 2) -> subprocess.Popen:
    """CPU processes (gloo, one thread each) on a port of their own, so that two launches can run side by side.
    Several CPU processes need torchrun's launcher (``--multi_gpu`` or an FSDP config) with ``ACCELERATE_USE_CPU=1``,
    which makes accelerate use the gloo backend; ``--cpu`` alone starts one process."""
    from helpers.local_hub import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(launcher), str(TRAIN_SCRIPT), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(launched: subprocess.Popen) -> str:
    output, _ = launched.communicate(timeout=600)
    assert launched.returncode == 0, output[-4000:]
    return output


def read_log(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def fsdp_weights(checkpoint: Path, part: str, tmp_path: Path) -> dict:
    """An FSDP checkpoint's sharded state (torch.distributed.checkpoint folder ``part``) as one plain state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}-{part}.pt"
    dcp_to_torch_save(checkpoint / part, target)
    return torch.load(target, weights_only=False)


def pipeline_weights(out: Path) -> dict[str, torch.Tensor]:
    return {f"{folder}/{key}": value for folder in ("unet", "text_encoder")
            for key, value in load_file(next((out / folder).glob("*.safetensors"))).items()}


def ema_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)


def _flat(tree, prefix=""):
    """(path, tensor) for every tensor in a nested dict / list (optimizer states)."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from _flat(tree[key], f"{prefix}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _flat(value, f"{prefix}/{i}")


STEPS, LR, EPS = 4, 1e-4, 1e-8
# float64 (see the tests' docstrings): a gradient differs by at most ~1e-12 between reduction orders, Adam turns that
# into at most lr / eps * 1e-12 per step
TOLERANCE = STEPS * LR / EPS * 1e-12


@pytest.fixture(scope="module")
def runs(stage1, emoji16_tiny, tmp_path_factory) -> dict[str, Path]:
    """The same 4 float64 steps of 4 images each (checkpoints at 2 and 4), side by side in pairs: FSDP and DDP on
    2 processes of 2 images; then FSDP again from FSDP's step-2 checkpoint, and 1 process of 4 images (this one)."""
    tmp = tmp_path_factory.mktemp("distributed")
    launcher = tmp / "train_float64.py"
    launcher.write_text(LAUNCHER)
    common = ["--max_train_steps", str(STEPS), "--checkpointing_steps", str(STEPS // 2), "--learning_rate", str(LR),
              "--adam_epsilon", str(EPS)]
    out = {name: tmp / name for name in ("fsdp", "ddp", "fsdp-resumed", "one")}
    first = [_launch(launcher, tiny_args(stage1, emoji16_tiny, out["fsdp"], *common), "--config_file", str(FSDP_CONFIG)),
             _launch(launcher, tiny_args(stage1, emoji16_tiny, out["ddp"], *common), "--multi_gpu")]
    out["fsdp-output"], out["ddp-output"] = _finish(first[0]), _finish(first[1])
    half = out["fsdp"] / f"checkpoint-{STEPS // 2}"
    out["fsdp-resumed"].mkdir()
    shutil.copytree(half, out["fsdp-resumed"] / half.name)
    resumed = _launch(launcher, tiny_args(stage1, emoji16_tiny, out["fsdp-resumed"], *common, "--resume_from_checkpoint",
                                          "latest"), "--config_file", str(FSDP_CONFIG))
    # meanwhile the one-process run, in this process (the same script; float64 as the launcher sets it)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    reset_accelerate_state()
    try:
        train_main(tiny_args(stage1, emoji16_tiny, out["one"], *common, "--train_batch_size", "4"))
    finally:
        torch.set_default_dtype(dtype)
        reset_accelerate_state()
    out["resumed-output"] = _finish(resumed)
    return out


def test_two_process_cpu_run_matches_one_process(runs):
    """accelerate launch --num_processes 2 (gloo on CPU) with batch 2 per process = 1 process with batch 4.

    The two runs sum the same per-example gradients in another order (two means all-reduced vs one mean), so they
    can only agree up to rounding; Adam then divides by sqrt(v) + eps and turns a rounding difference in a gradient
    near zero into a difference of up to lr per step. Both runs therefore train in float64 (the script is unchanged;
    the launcher sets torch's default dtype): a gradient differs by at most ~n * 1.1e-16 * sum|g_i| with n <= 1e4
    terms per reduction here, so below 1e-12, and Adam changes the update by at most lr / eps times that, so the
    weights after ``steps`` steps differ by at most steps * lr / eps * 1e-12 = 4 * 1e-4 / 1e-8 * 1e-12 = 4e-8 (this
    bound is the tolerance). Observed: ~1e-15, seven orders of magnitude below it.
    """
    assert "2 processes (DistributedType.MULTI_CPU)" in runs["ddp-output"]
    one, two = read_log(runs["one"]), read_log(runs["ddp"])
    assert len(one) == len(two) == STEPS
    np.testing.assert_allclose([r["loss"] for r in one], [r["loss"] for r in two], rtol=1e-12)
    last = f"checkpoint-{STEPS}"
    wa, wb = load_file(runs["one"] / last / "model.safetensors"), load_file(runs["ddp"] / last / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(value.dtype == torch.float64 for value in wa.values())
    worst = max((wa[key] - wb[key]).abs().max().item() for key in wa)
    print(f"two-process vs one-process weights: max difference {worst:.3g}, tolerance {TOLERANCE:.3g}")
    assert worst <= TOLERANCE


def test_fsdp_resumes_exactly_and_exports_the_ddp_pipeline(runs, tmp_path):
    """4 steps under FSDP (checkpoint at step 2) and under DDP side by side, then FSDP again from the step-2 checkpoint.

    Resume: the same processes, threads and reduction order redo the same float operations, so the resumed run must
    equal the uninterrupted one bit for bit (losses, sharded weights and optimiser state, EMA, exported pipeline).

    FSDP vs DDP: FSDP gathers the full weights for every forward (bitwise the same as DDP's replicas) but reduces
    gradients with reduce-scatter (FSDP1: pre-divided by the world size; FSDP2: its own division), clips with a norm
    summed from shards, and runs AdamW on shards. Each of those can round differently from DDP's all-reduce, norm
    of per-tensor norms and whole-tensor AdamW, so bitwise equality is not promised (in float32, measured with
    these flags: FSDP1 equal to DDP after 2 steps, 3e-8 apart after 4; FSDP2 9e-8 after 2, 1e-6 after 4; Adam
    turns last-bit gradient differences near zero into update differences up to lr). Hence float64 and the bound
    of the DDP test: in float64 a gradient differs by at most ~1e-12 (n <= 1e4 terms per reduction, 1.1e-16
    each), Adam turns that into at most lr / eps * 1e-12 per step, so weights and EMA (a convex combination of
    weights) differ by at most steps * lr / eps * 1e-12 = 4e-8.
    The pipeline is saved in float32: rounding adds at most one float32 ulp, 2^-23 |w| (rtol 2^-22 covers a
    binade edge). Observed: ~1e-16 in float64, equal in float32.
    """
    steps, tolerance = STEPS, TOLERANCE
    full, ddp, cut = runs["fsdp"], runs["ddp"], runs["fsdp-resumed"]
    assert "2 processes (DistributedType.FSDP)" in runs["fsdp-output"]
    # the checkpoint at step 2 is sharded: one torch.distributed.checkpoint file per process
    half = full / f"checkpoint-{steps // 2}"
    assert len(list((half / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert len(list((half / "optimizer_0").glob("*.distcp"))) == 2
    assert f"Resumed from {cut / half.name}" in runs["resumed-output"]

    # resume == uninterrupted, bit for bit
    last = f"checkpoint-{steps}"
    assert [r["loss"] for r in read_log(full)][steps // 2:] == [r["loss"] for r in read_log(cut)]
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        a, b = fsdp_weights(full / last, part, tmp_path), fsdp_weights(cut / last, part, tmp_path)
        flat_a, flat_b = dict(_flat(a)), dict(_flat(b))
        assert flat_a.keys() == flat_b.keys() and flat_a, part
        for key, value in flat_a.items():
            assert torch.equal(value, flat_b[key]), (part, key)
    ema_full, ema_cut = ema_state(full / last), ema_state(cut / last)
    assert ema_full["optimization_step"] == ema_cut["optimization_step"] == steps
    assert all(torch.equal(a, b) for a, b in zip(ema_full["shadow_params"], ema_cut["shadow_params"], strict=True))
    exported_full, exported_cut = pipeline_weights(full), pipeline_weights(cut)
    assert exported_full.keys() == exported_cut.keys()
    assert all(torch.equal(exported_full[k], exported_cut[k]) for k in exported_full)

    # FSDP == DDP within the float64 bound
    np.testing.assert_allclose([r["loss"] for r in read_log(full)], [r["loss"] for r in read_log(ddp)], rtol=1e-12)
    live_fsdp = fsdp_weights(full / last, "pytorch_model_fsdp_0", tmp_path)["model"]
    live_ddp = load_file(ddp / last / "model.safetensors")
    assert live_fsdp.keys() == live_ddp.keys()
    assert all(value.dtype == torch.float64 for value in live_ddp.values())
    worst = max((live_fsdp[k] - live_ddp[k]).abs().max().item() for k in live_ddp)
    print(f"FSDP vs DDP weights: max difference {worst:.3g}, tolerance {tolerance:.3g}")
    assert worst <= tolerance
    ema_ddp = ema_state(ddp / last)
    assert ema_ddp["optimization_step"] == steps
    assert len(ema_full["shadow_params"]) == len(ema_ddp["shadow_params"])  # the same file: full UNet tensors
    for a, b in zip(ema_full["shadow_params"], ema_ddp["shadow_params"]):
        assert a.shape == b.shape and (a - b).abs().max().item() <= tolerance
    exported_ddp = pipeline_weights(ddp)
    assert exported_full.keys() == exported_ddp.keys()
    for key in exported_ddp:
        torch.testing.assert_close(exported_full[key], exported_ddp[key], atol=tolerance, rtol=2**-22, msg=key)
    # the exported UNet holds the EMA weights (gathered from the shards), not the live ones, as under DDP
    from ldm_diffusers import LDMPipeline

    unet = LDMPipeline.from_pretrained(full).unet
    for shadow, param in zip(ema_full["shadow_params"], unet.parameters(), strict=True):
        assert torch.equal(param, shadow.to(param.dtype))
    assert not torch.equal(unet.conv_in.weight, live_fsdp["unet.conv_in.weight"].to(torch.float32))


@pytest.mark.parametrize("name", ["fsdp_full_shard", "deepspeed_zero2", "multi_gpu_ddp"])
def test_shipped_configs_load_with_accelerates_loader(name):
    """accelerate's own config loader reads every shipped config (DeepSpeed is not installed here: its run is not
    tested; the FSDP one runs in the test above)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(FSDP_CONFIG.parent / f"{name}.yaml"))
    expected = {"fsdp_full_shard": DistributedType.FSDP, "deepspeed_zero2": DistributedType.DEEPSPEED,
                "multi_gpu_ddp": DistributedType.MULTI_GPU}[name]
    assert config.distributed_type == expected and config.mixed_precision == "bf16"
    if name == "fsdp_full_shard":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FULL_SHARD
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        wrapped = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert wrapped == [BasicTransformerBlock.__name__, ResnetBlock2D.__name__]
    if name == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2
        assert "gradient_accumulation_steps" not in config.deepspeed_config  # "auto": the script's flag


def test_auto_wrap_keeps_the_block_classes_the_model_has():
    """One FSDP config for every mode: a UNet without attention has no BasicTransformerBlock, and accelerate
    raises on a class name the model lacks."""
    from types import SimpleNamespace

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from ldm_diffusers.models.unet import LDMUNet2DConditionModel
    from ldm_diffusers.training.distributed import WRAP_CANDIDATES, _fit_wrap_policy

    def unet(context_dim):  # cross-attention (text, class, layout) or plain self-attention (the other modes)
        return LDMUNet2DConditionModel.from_ldm_config(
            latent_channels=3, context_dim=context_dim, base_channels=16, channel_multipliers=[1, 2],
            attention_head_dim=8, norm_num_groups=8, sample_size=4)

    for context_dim, kept in ((32, ["BasicTransformerBlock", "ResnetBlock2D"]), (None, ["ResnetBlock2D"])):
        for names in (["BasicTransformerBlock", "ResnetBlock2D"], None):
            plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=names)
            _fit_wrap_policy(plugin, unet(context_dim))
            assert plugin.transformer_cls_names_to_wrap == kept
    assert set(WRAP_CANDIDATES) == {"BasicTransformerBlock", "ResnetBlock2D"}
