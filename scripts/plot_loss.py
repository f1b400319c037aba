"""Plot a training run's loss log: python scripts/plot_loss.py RUN/loss.json OUT.png"""

import json
import sys

from epsscale.plots import plot_loss

plot_loss(json.load(open(sys.argv[1])), sys.argv[2])
