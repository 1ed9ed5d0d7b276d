"""``python -m napari_kidseg.cli``, as the ``kidseg`` command."""

import sys

from . import main

sys.exit(main())
