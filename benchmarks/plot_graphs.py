"""Eager vs CUDA-graph bars from tp_step.py --graph and decode.py JSON:

    python benchmarks/plot_graphs.py OUT.png TP_STEP.json DECODE.json
"""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out, step_path, decode_path):
    step, dec = json.load(open(step_path)), json.load(open(decode_path))
    panels = []
    for key, rows in step["results"].items():
        panels.append((f"train step {key} (tp={step['tp']})",
                       {k: v[0] for k, v in rows.items() if v[0] == v[0]}))
    for b in sorted({r["batch"] for r in dec["rows"]}):
        rows = {r["variant"]: r["median_ms"] for r in dec["rows"]
                if r["batch"] == b and "median_ms" in r}
        panels.append((f"decode per token, batch {b} (tp={dec['tp']})", rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, (title, rows) in zip(axes, panels):
        names = list(rows)
        colors = ["#2ca02c" if "shardtensor" in n else "#1f77b4" if "megatron" in n else
                  "#d62728" if "dtensor" in n else "#999999" for n in names]
        ax.bar(range(len(names)), [rows[n] for n in names], color=colors,
               hatch=None)
        for i, n in enumerate(names):
            if "graph" in n:
                ax.patches[i].set_hatch("//")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.set_ylabel("ms")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:4])
