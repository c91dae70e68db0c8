"""``python -m training fit --config configs/<x>.yaml``: the covmodules Lightning CLI."""

import sys

from .cli import main

sys.exit(main())
