"""Never imported by the tests: the hostile-checkpoint corpus names ``helpers.canary.fire``, so a loader that imported
or called what a checkpoint names would leave this module in ``sys.modules`` and run its command."""

import os

os.environ["LDM_CANARY_IMPORTED"] = "1"


def fire(command: str) -> None:
    os.system(command)
