"""Plot step time per variant from tp_step.py JSON files: python benchmarks/plot.py OUT.png J1.json [J2.json ...]"""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out, paths):
    runs = [json.load(open(p)) for p in paths]
    keys = [k for k in runs[0]["results"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
    variants = ["serial", "megatron", "dtensor", "shardtensor"]
    colors = dict(serial="#999999", megatron="#1f77b4", dtensor="#d62728", shardtensor="#2ca02c")
    for ax, key in zip(axes, keys):
        width = 0.8 / len(runs)
        for j, run in enumerate(runs):
            rows = run["results"].get(key, {})
            xs = [i for i, v in enumerate(variants) if v in rows]
            ax.bar([x + j * width for x in xs], [rows[variants[x]][0] for x in xs], width,
                   color=[colors[variants[x]] for x in xs], alpha=1.0 if j == len(runs) - 1 else 0.45,
                   label=f"tp={run['tp']}")
        ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(variants))])
        ax.set_xticklabels(variants, rotation=30)
        ax.set_title(key)
        ax.set_ylabel("step ms (fwd+bwd)")
    axes[0].legend(["pale: tp=1 (H100)", "solid: tp=2 (2x H200)"][:len(runs)], fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
