"""The example scripts' own ``main`` functions, run in the test process: the code a user's ``python
examples/X.py ...`` runs, without a new interpreter importing torch, diffusers and transformers again (about 9 s
on the test machine). Tests that need a process of their own (signals, multi-process launches, a clean
interpreter) still start one."""

import importlib.util

from helpers.paths import REPO


def example_main(script: str):
    """``main(argv)`` of ``examples/<script>``."""
    path = REPO / "examples" / script
    spec = importlib.util.spec_from_file_location(f"examples_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; each training run in this process needs fresh ones."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
