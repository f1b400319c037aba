"""Plot a training run's loss log and say how long it trained.

    python scripts/plot_loss.py RUN/loss.json OUT.png

The wall time adds up the time between consecutive log entries (one every 200 steps). A block
slower than 5x the median per step spanned a stop (a run split over sessions): its steps count at
the median rate of all blocks, as do the first block's (it has no start time).
"""

import json
import statistics
import sys

from epsscale.plots import plot_loss


def wall_time(log: list[dict]) -> tuple[float, int, float]:
    """(seconds of training, blocks that spanned a stop, median seconds per step) of a loss log."""
    blocks = [(b["step"] - a["step"], b["time"] - a["time"]) for a, b in zip(log, log[1:]) if "time" in a and "time" in b]
    if not blocks:
        return float("nan"), 0, float("nan")
    rate = statistics.median(d / n for n, d in blocks)
    stops = [(n, d) for n, d in blocks if d / n > 5 * rate]
    seconds = sum(d for n, d in blocks if d / n <= 5 * rate) + rate * (sum(n for n, _ in stops) + log[0]["step"])
    return seconds, len(stops), rate


if __name__ == "__main__":
    log = json.load(open(sys.argv[1]))
    plot_loss(log, sys.argv[2])
    seconds, stops, rate = wall_time(log)
    print(f"{sys.argv[2]}: steps {log[0]['step']}..{log[-1]['step']}, training time {seconds / 3600:.2f} h "
          f"(median {rate:.2f} s a step; {stops} block(s) spanned a stop and count at that rate)")
