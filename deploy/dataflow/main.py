"""Flex-template entry point: the launcher runs this file with the template's parameters as flags.

Dataflow's launcher runs ``python main.py`` (``FLEX_TEMPLATE_PYTHON_PY_FILE``) with Beam's
options (``--runner=DataflowRunner``, ``--project``, ``--region``, ``--staging_location``,
``--temp_location``, ``--template_location=gs://.../job_object``, ...) and each template parameter
as ``--name=value``; our flags accept underscores (``--batch_size``) because parameter names
cannot hold dashes, and on/off flags accept ``--prune=true``. With ``--template_location`` Beam's
DataflowRunner writes the job to that file and the launcher creates the job from it after this
program exits, so the job plans, writes its plan and the job file, and returns at once
(``pipeline.launch``): the workers renew the table's lease and give it back when they finish.
"""

import os

from pipeline import launch
from pipeline.extract import main

if __name__ == "__main__":
    os.environ[launch.FLEX_LAUNCH_ENV] = "1"  # --template_location is the launcher's job file
    main()
