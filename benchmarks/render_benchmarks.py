"""Renders a pytest-benchmark JSON (from benchmarks/test_bench_*.py) into markdown tables and a plot.

    python -m harmodt_fast.benchmarks.render_benchmarks bench.json [--out benchmarks/results/bench] [--readme README.md]

Per group (extra_info["group"], else the test's name): every implementation's median time, achieved TFLOP/s and
GB/s from the counted FLOPs and bytes, and its ratio to the first implementation of the group (ours). With
--readme, the tables replace what stands between the README's `<!-- bench:begin -->` and `<!-- bench:end -->`.
"""
from __future__ import annotations

import argparse
import json
import os
import re


def rows_of(report: dict) -> dict[str, list[dict]]:
    """{group: [{"name", "impl", "median_s", "tflops", "gbs", "info"}]} in the order the benchmarks ran."""
    groups: dict[str, list[dict]] = {}
    for b in report["benchmarks"]:
        info = b.get("extra_info", {})
        median = float(b["stats"]["median"])
        groups.setdefault(info.get("group", b["name"].split("[")[0]), []).append({
            "name": b["name"], "impl": info.get("impl", b.get("param") or b["name"]), "median_s": median,
            "tflops": info.get("flops", 0) / median / 1e12 if median > 0 else 0.0,
            "gbs": info.get("bytes", 0) / median / 1e9 if median > 0 else 0.0, "info": info})
    return groups


def markdown(report: dict) -> str:
    machine = report.get("machine_info", {})
    lines = [f"pytest-benchmark on {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
             f"{report.get('datetime', '?')}, commit {report.get('commit_info', {}).get('id', '?')[:10]}", ""]
    for group, rows in rows_of(report).items():
        first = rows[0]["median_s"]
        info = rows[0]["info"]
        shape = ", ".join(f"{k} {info[k]}" for k in ("device", "dtype", "tasks", "rows", "in", "out", "sequences")
                          if k in info)
        lines += [f"**{group}** ({shape})", "", "| impl | median ms | TFLOP/s | GB/s | speed vs first |",
                  "| --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {r['impl']} | {1e3 * r['median_s']:.3f} | {r['tflops']:.3f} | {r['gbs']:.2f} | "
                         f"{first / r['median_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = rows_of(report)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.5), squeeze=False)
    for ax, (group, rows) in zip(axes[0], groups.items()):
        ax.bar(range(len(rows)), [1e3 * r["median_s"] for r in rows])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([str(r["impl"]) for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("median ms")
        ax.set_title(group, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_readme(readme: str, tables: str) -> None:
    text = open(readme).read()
    pattern = re.compile(r"(<!-- bench:begin -->\n).*?(<!-- bench:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme}: no <!-- bench:begin --> ... <!-- bench:end --> section to fill")
    with open(readme, "w") as f:
        f.write(pattern.sub(lambda m: m.group(1) + tables + "\n" + m.group(2), text))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="pytest-benchmark --benchmark-json output")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.png (default: next to the JSON)")
    p.add_argument("--readme", default=None, help="replace the README's bench section with the tables")
    args = p.parse_args(argv)
    with open(args.json) as f:
        report = json.load(f)
    out = args.out or os.path.splitext(args.json)[0]
    tables = markdown(report)
    with open(out + ".md", "w") as f:
        f.write(tables + "\n")
    figure = plot(report, out + ".png")
    if args.readme:
        update_readme(args.readme, tables)
    print(f"wrote {out}.md" + (f" and {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
