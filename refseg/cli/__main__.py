"""``python -m refseg.cli <verb> ...``: the same as the ``refseg`` command."""

import sys

from refseg.cli import main

sys.exit(main())
