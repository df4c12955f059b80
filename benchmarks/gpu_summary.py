"""Folds what the GPU run's stages wrote into its scratch folder into the two result files that come back:
OUT/summary.json (everything, machine-readable) and OUT/summary.md (the tables and the headline ratios, each as
a fraction of the ceilings measured on the same device). benchmarks/gpu_run.sh calls it after every stage, so a
run cut short still brings back what it measured.

    python -m harmodt_fast.benchmarks.gpu_summary --work SCRATCH --out OUT [--cache TRITON_CACHE_DIR]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

from harmodt_fast.benchmarks import kernel_variants


def _json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _newest(pattern):
    paths = sorted(glob.glob(pattern), key=os.path.getmtime)
    return paths[-1] if paths else None


def stages(work: str) -> list[dict]:
    out = []
    path = os.path.join(work, "stages.tsv")
    if os.path.exists(path):
        for line in open(path):
            name, rc, start, end, limit, poison = line.split()
            out.append({"stage": name, "exit": int(rc), "started_s": int(start), "ended_s": int(end),
                        "limit_s": int(limit), "poison": poison == "1"})
    return out


def tests(junit: str) -> dict | None:
    if not os.path.exists(junit):
        return None
    try:
        root = ET.parse(junit).getroot()
    except ET.ParseError as e:
        return {"error": f"unreadable junit file: {e}"}
    cases = root.iter("testcase")
    res = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "slowest": []}
    timed = []
    for c in cases:
        name = f"{c.get('classname', '')}::{c.get('name')}"
        timed.append((float(c.get("time", 0)), name))
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        if bad is not None:
            res["failed"] += 1
            res["failures"].append({"test": name, "message": (bad.get("message") or bad.text or "")[:600]})
        elif c.find("skipped") is not None:
            res["skipped"] += 1
        else:
            res["passed"] += 1
    res["slowest"] = [{"test": n, "s": round(t, 2)} for t, n in sorted(timed, reverse=True)[:10]]
    return res


def collect(work: str, out: str, cache: str | None) -> dict:
    env = _json(os.path.join(work, "env.json"))
    summary = {"env": env, "stages": stages(work), "tests": tests(os.path.join(out, "tests.xml"))}
    for key, pattern in [("train_step", "train_step/train_step_*.json"), ("profile", "profile/train_step_*.json"),
                         ("train_compiled", "train_compiled/train_step_*.json"), ("kernels", "kernels/kernels_*.json"),
                         ("evaluation", "eval/evaluation_*.json")]:
        path = _newest(os.path.join(work, pattern))
        summary[key] = _json(path) if path else None
    scale = os.path.join(work, "scale", "results.jsonl")
    summary["scale"] = [json.loads(line) for line in open(scale) if line.strip()] if os.path.exists(scale) else None
    variants = kernel_variants.count(os.path.join(work, "variants.jsonl"), cache)
    carried = os.path.join(work, "cache_carried.txt")
    if os.path.exists(carried):  # compiled kernels that travelled with the run (benchmarks/precompile.py)
        variants["carried"] = int(open(carried).read().strip() or 0)
        variants["precompiled"] = _json(os.path.join(work, "precompiled.json"))
        if "compiled" in variants:
            variants["compiled_during_run"] = variants["compiled"] - variants["carried"]
    summary["kernel_variants"] = variants
    summary["headline"] = headline(summary)
    return summary


def _row(table, prefix):
    return next((r for r in (table or {}).get("rows", []) if r["path"].startswith(prefix)), None)


def headline(s: dict) -> dict:
    """The ratios the run is for, side by side: speed ratios and each side's fraction of the measured ceiling."""
    h: dict = {}
    ts = s.get("train_step")
    ours, pub, dense = _row(ts, "ours (eager)"), _row(ts, "published procedure"), _row(ts, "unmasked prompt-dt")
    if ours:
        h["train_step"] = {name: {"sequences_per_s": r["sequences_per_s"],
                                  "fraction_of_matmul_ceiling": r.get("fraction_of_matmul_ceiling")}
                           for name, r in (("ours", ours), ("published", pub), ("unmasked", dense)) if r}
        h["ours_vs_published"] = ours["sequences_per_s"] / pub["sequences_per_s"] if pub else None
        h["ours_vs_unmasked"] = ours["sequences_per_s"] / dense["sequences_per_s"] if dense else None
    upd_ours, upd_pub = _row(ts, "ours mask update"), _row(ts, "published mask update")
    if upd_ours:
        h["mask_update_s"] = {"ours": upd_ours["s_per_update"], "published": upd_pub and upd_pub["s_per_update"]}
    k = s.get("kernels")
    if k:
        ceil = k["meta"].get("ceilings", {}).get("matmul_bf16_tflops")
        pairs = []
        for r in k["rows"]:
            if r.get("op") != "forward" or r.get("impl") != "ours":
                continue
            other = next((o for o in k["rows"] if o.get("shape") == r["shape"] and o.get("op") == "forward"
                          and o.get("impl") == "cuBLAS unmasked"), None)
            ms = lambda x: x.get("gpu_ms") or x.get("wall_ms")  # noqa: E731
            if other and ms(r) and ms(other):
                frac = lambda x: x["flops"] / (ms(x) * 1e-3) / 1e12 / ceil if ceil else None  # noqa: E731
                pairs.append({"shape": r["shape"], "ours_ms": ms(r), "cublas_ms": ms(other),
                              "cublas_over_ours": ms(other) / ms(r), "ours_fraction_of_ceiling": frac(r),
                              "cublas_fraction_of_ceiling": frac(other)})
        h["masked_matmul_vs_cublas"] = pairs
    return h


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def markdown(s: dict, work: str) -> str:
    env = s.get("env") or {}
    ceil = env.get("ceilings") or {}
    lines = ["# First GPU run: summary", "",
             f"{env.get('device', '?')}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}; "
             f"commit {(env.get('git_commit') or 'unknown (no git history)')[:10]}, source sha256 "
             f"{str(env.get('source_sha256'))[:12]} (`device_ceilings.py --digest` here); {env.get('date')}; "
             f"autotune {'on' if env.get('autotune') else 'off (pinned configs[0])'}.", "",
             f"Measured ceilings: bf16 matmul {_fmt(ceil.get('matmul_bf16_tflops'), '.1f')} TFLOP/s, fp32 matmul "
             f"{_fmt(ceil.get('matmul_fp32_tflops'), '.1f')} TFLOP/s, device copy {_fmt(ceil.get('copy_tbps'), '.2f')} "
             f"TB/s{' (quick: dry run, not a measurement)' if ceil.get('quick') else ''}.", "",
             "## Stages", "", "| stage | exit | started s | ended s | limit s | poisoned outputs |", "|---|---|---|---|---|---|"]
    for st in s["stages"]:
        lines.append(f"| {st['stage']} | {st['exit']}{' (time limit)' if st['exit'] == 124 else ''} | "
                     f"{st['started_s']} | {st['ended_s']} | {st['limit_s']} | {'yes' if st['poison'] else 'no'} |")
    t = s.get("tests")
    if t:
        lines += ["", "## Correctness", "", f"{t.get('passed')} passed, {t.get('failed')} failed, "
                  f"{t.get('skipped')} skipped."]
        lines += [f"- FAILED {f['test']}: {f['message'][:300]}" for f in t.get("failures", [])]
    h = s["headline"]
    if h.get("train_step"):
        lines += ["", "## Headline", "", "| training step | sequences/s | of bf16 matmul ceiling |", "|---|---|---|"]
        lines += [f"| {n} | {_fmt(r['sequences_per_s'], '.0f')} | {_fmt(r['fraction_of_matmul_ceiling'])} |"
                  for n, r in h["train_step"].items()]
        lines += ["", f"ours / published procedure: {_fmt(h.get('ours_vs_published'))}x; ours / unmasked prompt-dt: "
                  f"{_fmt(h.get('ours_vs_unmasked'))}x."]
    if h.get("mask_update_s"):
        lines.append(f"Mask update: ours {_fmt(h['mask_update_s']['ours'])} s, published "
                     f"{_fmt(h['mask_update_s']['published'])} s.")
    if h.get("masked_matmul_vs_cublas"):
        lines += ["", "| masked matmul forward | ours ms | cuBLAS unmasked ms | cuBLAS / ours | ours of ceiling | "
                  "cuBLAS of ceiling |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['shape']} | {_fmt(p['ours_ms'])} | {_fmt(p['cublas_ms'])} | {_fmt(p['cublas_over_ours'])} | "
                  f"{_fmt(p['ours_fraction_of_ceiling'])} | {_fmt(p['cublas_fraction_of_ceiling'])} |"
                  for p in h["masked_matmul_vs_cublas"]]
    prof = s.get("profile")
    ours_prof = _row(prof, "ours (eager)")
    if ours_prof and ours_prof.get("top_kernels"):
        lines += ["", "## One profiled step (ours)", "",
                  f"host {_fmt(ours_prof.get('host_ms'))} ms, device {_fmt(ours_prof.get('device_ms'))} ms, "
                  f"{ours_prof.get('launches')} launch calls, {ours_prof.get('kernels')} kernels.", "",
                  "| kernel | calls | device ms |", "|---|---|---|"]
        lines += [f"| `{k['name'][:90]}` | {k['calls']} | {_fmt(k['device_ms'])} |" for k in ours_prof["top_kernels"]]
    kv = s.get("kernel_variants") or {}
    if kv:
        pre = kv.get("precompiled") or {}
        lines += ["", "## Kernel variants", "", f"launched variants (interpreter count): {kv.get('variants', '-')}; "
                  f"compiled kernels in the Triton cache at the end: {kv.get('compiled', '-')}, of which carried in "
                  f"(precompiled without a GPU{', triton ' + pre['triton'] if pre.get('triton') else ''}): "
                  f"{kv.get('carried', '-')}, compiled during the run: {kv.get('compiled_during_run', '-')}."]
    # the stages' own tables, as their benchmarks rendered them
    for title, pattern in [("Training step", "train_step/train_step_*.md"), ("Compiled training step",
                           "train_compiled/train_step_*.md"), ("Kernels", "kernels/kernels_*.md"),
                           ("Scale", "scale/results.md")]:
        path = _newest(os.path.join(work, pattern))
        if path:
            body = open(path).read().split("\n", 1)[-1]
            lines += ["", f"## {title}", body.replace("\n## ", "\n### ").replace("\n# ", "\n### ")]
    ev = s.get("evaluation")
    if ev:
        lines += ["", "## Evaluation", "", "```", json.dumps({k: ev.get(k) for k in ("ours", "published_loop")
                                                              if k in ev}, indent=1)[:3000], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", help="the run's Triton cache folder (compiled kernels are counted)")
    args = ap.parse_args(argv)
    s = collect(args.work, args.out, args.cache)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(s, f, indent=1, default=str)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(markdown(s, args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
