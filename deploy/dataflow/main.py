"""Flex-template entry point: the launcher runs this file with the template's parameters as flags.

Parameters arrive as ``--name=value``; our flags accept underscores (``--batch_size``) because
template parameter names cannot hold dashes. Beam options (``--runner``, ``--project``, ...) are
added by the launcher.
"""

from pipeline.extract import main

if __name__ == "__main__":
    main()
