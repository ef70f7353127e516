"""Shared start of the Ray job entrypoints: make the repository importable, run one CLI verb.

`ray job submit --working-dir .` uploads the repository and runs `python jobs/<stage>.py` in it;
the workers get the same working directory on their PYTHONPATH, so `pipeline` imports there too.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run(verb: str) -> None:
    from pipeline.cli import main

    sys.exit(main([verb, *sys.argv[1:]]))
