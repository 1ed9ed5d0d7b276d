"""Speed and memory of the cascade on 512 x 512 x N phantoms; prints a markdown table.

    python benchmarks/bench_cascade.py --sizes 100 300 600 [--device cuda] [--preset paper]

Same as ``kidseg bench``. ``--preset paper`` times the paper's SE-ResNeXt50 networks with random
weights (speed does not depend on the weights); the default uses the bundled checkpoints.
"""

import sys

from napari_kidseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
