"""Plot a training run's loss log: python scripts/plot_loss.py docs/fmnist_adm_loss.json docs/fmnist_adm_loss.png"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = json.load(open(sys.argv[1]))
steps = [r["step"] for r in log]
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(steps, [r["mse"] for r in log], label="L_simple (eps MSE)")
ax.plot(steps, [r["vb"] for r in log], label="L_vlb term (bits/dim)")
ax.set_yscale("log")
ax.set_xlabel("step (batch 64)")
ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
