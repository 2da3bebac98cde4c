"""A web demo for any :class:`~ldm_diffusers.LDMPipeline`: ``ldm-diffusers demo --model PATH_OR_HUB_ID``.

* :mod:`.inputs`: which inputs each conditioning mode takes and how the widgets' values become pipeline inputs;
* :mod:`.generation`: the pipeline call and the ``ldm-diffusers generate`` command that reproduces it;
* :mod:`.app`: the Gradio app (``pip install 'ldm-diffusers[demo]'``);
* :mod:`.space`: a Hugging Face Space folder that runs the app for a model on the Hub, and its upload.
"""

from .generation import Settings, generate_command, run, write_inputs
from .inputs import DemoInputError, pipeline_mode
from .space import push_space, space_files

__all__ = ["DemoInputError", "Settings", "generate_command", "pipeline_mode", "push_space", "run", "space_files",
           "write_inputs"]
