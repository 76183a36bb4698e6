"""``python -m locore_plugin.evaluation``: the ``locore-plugin eval`` command."""
import sys

from .command import main

sys.exit(main())
