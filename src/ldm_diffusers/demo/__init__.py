"""A web demo for any :class:`~ldm_diffusers.LDMPipeline`: ``ldm-diffusers demo --model PATH_OR_HUB_ID``.

Each conditioning mode builds its own input widgets (``ConditioningMode.demo_inputs``, value rules in
:mod:`ldm_diffusers.conditioning.widgets`); this package holds what every mode shares:

* :mod:`.generation`: the pipeline call and the ``ldm-diffusers generate`` command that reproduces it;
* :mod:`.app`: the Gradio app (``pip install 'ldm-diffusers[demo]'``); the Space that serves it is
  :mod:`ldm_diffusers.hub.space`.
"""

from .generation import Settings, generate_command, run, write_inputs

__all__ = ["Settings", "generate_command", "run", "write_inputs"]
