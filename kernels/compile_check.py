"""Compiles the kernels for an NVIDIA GPU without one: Triton's CUDA backend lowers to PTX and runs ptxas on the
host, so type errors, unsupported ops, shared-memory overflows and register spills show up on any machine.

    python -m harmodt_fast.kernels.compile_check            # each kernel's configs[0] (the pinned mode), sm_90
    python -m harmodt_fast.kernels.compile_check --all      # every autotune config of every kernel
    python -m harmodt_fast.kernels.compile_check --markdown RUN.jsonl...   # a table of runs (COMPILE_CHECK.md)

Must run WITHOUT TRITON_INTERPRET (the interpreter replaces the compiler). Prints a JSON line about the run (Triton
and ptxas versions, date, machine), then one per variant with registers, spilled bytes, shared memory and whether
the matmuls became wgmma; exits 1 if any variant fails.
Integer arguments that are multiples of 16 in real use are marked so (as Triton's launcher would), which decides
whether loads are vectorised and pipelined.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# arguments that are multiples of 16 at the shapes that matter (Triton's launcher marks them the same way)
_DIV16 = {"M", "R", "C", "LD", "W_WORDS", "M_BUCKET", "N", "K", "ROWS_PER_SPLIT", "D_IN", "D_MID", "D_OUT", "LD1",
          "LD2", "W1_WORDS", "W2_WORDS", "H"}


def _variants(full: bool):
    """(label, kernel, signature, constexprs, num_warps, num_stages, pinned) of each variant to compile: every
    autotune config with `full`, else each kernel's configs[0], the one HARMODT_FAST_AUTOTUNE=0 launches (pinned);
    blocks the launchers choose in Python come from their own functions."""
    from triton.backends.nvidia.compiler import CUDAOptions

    from harmodt_fast.kernels import masked_attention as ka
    from harmodt_fast.kernels import masked_linear as kl
    from harmodt_fast.kernels import masked_mlp as km

    def cfgs(kernel):
        first = kernel.configs[0]
        return [(c.kwargs, c.num_warps, c.num_stages, c is first) for c in (kernel.configs if full else [first])]

    bf = "*bf16"
    mm_sig = dict(a_ptr=bf, w_ptr=bf, m_ptr="*i32", offs_ptr="*i32", bias_ptr=bf, aux_ptr=bf, out_ptr=bf, pre_ptr=bf,
                  M="i32", R="i32", C="i32", LD="i32", W_WORDS="i32", T="i32", M_BUCKET="i32")
    for blocks, w, s, pin in cfgs(kl._masked_mm_kernel):
        for contig, aligned, epi, act, pre in [(True, True, 0, 0, False), (False, True, 0, 0, False),
                                               (True, True, 1, 2, True), (False, True, 2, 1, False),
                                               (True, False, 0, 0, False)]:
            yield (f"masked_mm contig_r={contig} aligned={aligned} epi={epi} act={act} {blocks}", kl._masked_mm_kernel,
                   mm_sig, dict(CONTIG_R=contig, ALIGNED=aligned, HAS_BIAS=contig, EPI=epi, ACT=act, STORE_PRE=pre,
                                TF32=False, BLOCK_T=64 if aligned else 16, **blocks), w, s, pin)
    dw_sig = dict(dy_ptr=bf, x_ptr=bf, m_ptr="*i32", offs_ptr="*i32", dw_ptr="*fp32", db_ptr="*fp32", tg_ptr="*fp32",
                  M="i32", N="i32", K="i32", W_WORDS="i32", T="i32", ROWS_PER_SPLIT="i32", TASKS_PER_SPLIT="i32",
                  M_BUCKET="i32", TG_STRIDE="i32")
    for blocks, w, s, pin in cfgs(kl._masked_dw_kernel):
        for tg in (False, True):  # a 1024 x 1024 weight: the launcher's large tile without task grads
            tile = kl._dw_tile(1024, 1024, tg)
            yield (f"masked_dw tile={tile} task_grads={tg} {blocks}", kl._masked_dw_kernel, dw_sig,
                   dict(TASK_SPLIT=tg, HAS_DW=True, HAS_DB=True, HAS_TG=tg, ALIGNED=True, TF32=False,
                        BLOCK_N=tile[0], BLOCK_K=tile[1], **blocks), w, s, pin)
    # fp32 (the CPU-default precision, and precision="fp32" on a GPU): TF32 and full-precision dots, the dW kernel
    # with task grads, in the pinned configs; named "fp32 ..." since full-precision fp32 dots are not wgmma
    as_fp32 = lambda sig: {k: ("*fp32" if v == bf else v) for k, v in sig.items()}  # noqa: E731
    mm_blocks, mm_w, mm_s, _ = cfgs(kl._masked_mm_kernel)[0]
    for tf32 in (True, False):
        yield (f"fp32 masked_mm tf32={tf32} {mm_blocks}", kl._masked_mm_kernel, as_fp32(mm_sig),
               dict(CONTIG_R=True, ALIGNED=True, HAS_BIAS=True, EPI=0, ACT=0, STORE_PRE=False, TF32=tf32, BLOCK_T=64,
                    **mm_blocks), mm_w, mm_s, True)
    dw_blocks, dw_w, dw_s, _ = cfgs(kl._masked_dw_kernel)[0]
    tile = kl._dw_tile(1024, 1024, True)
    yield (f"fp32 masked_dw tile={tile} task_grads=True {dw_blocks}", kl._masked_dw_kernel, as_fp32(dw_sig),
           dict(TASK_SPLIT=True, HAS_DW=True, HAS_DB=True, HAS_TG=True, ALIGNED=True, TF32=False, BLOCK_N=tile[0],
                BLOCK_K=tile[1], **dw_blocks), dw_w, dw_s, True)
    ch_sig = dict(a_ptr=bf, w1_ptr=bf, m1_ptr="*i32", w2_ptr=bf, m2_ptr="*i32", offs_ptr="*i32", b1_ptr=bf,
                  b2_ptr=bf, aux_ptr=bf, mid_ptr=bf, pre_ptr=bf, out_ptr=bf, M="i32", D_IN="i32", D_MID="i32",
                  D_OUT="i32", LD1="i32", LD2="i32", W1_WORDS="i32", W2_WORDS="i32", T="i32", M_BUCKET="i32")
    for blocks, w, s, pin in cfgs(km._masked_chain_kernel):
        for bwd in (False, True):
            yield (f"masked_chain backward={bwd} {blocks}", km._masked_chain_kernel, ch_sig,
                   dict(BACKWARD=bwd, CONTIG=not bwd, ALIGNED1=True, ALIGNED2=True, HAS_B1=not bwd, HAS_B2=not bwd,
                        ACT=1, STORE_MID=True, STORE_PRE=False, TF32=False, BLOCK_T=64, BLOCK_OUT=256, **blocks), w, s,
                   pin)
    fwd_sig = dict(qkv_ptr=bf, mbits_ptr="*i32", out_ptr=bf, lse_ptr="*fp32", L="i32", H="i32", HEADS="i32",
                   D="i32", qk_scale="fp32", smb="i32", WPR="i32", seed_ptr="*i64", p_drop="fp32")
    bwd_sig = dict(do_ptr=bf, qkv_ptr=bf, out_ptr=bf, lse_ptr="*fp32", mbits_ptr="*i32", dqkv_ptr=bf, L="i32",
                   H="i32", HEADS="i32", D="i32", sm_scale="fp32", qk_scale="fp32", smb="i32", WPR="i32",
                   seed_ptr="*i64", p_drop="fp32")
    attention = [("attention_fwd", ka._attn_fwd_kernel, fwd_sig), ("attention_bwd", ka._attn_bwd_kernel, bwd_sig)]
    for name, kernel, sig in attention:
        for blocks, w, s, pin in cfgs(kernel):
            for d, drop in [(32, True), (64, False), (64, True)]:
                yield (f"{name} D={d} dropout={drop} {blocks}", kernel, sig,
                       dict(HAS_MASK=True, CAUSAL=True, DROPOUT=drop, BLOCK_D=d, **blocks), w, s, pin)
    qa_sig = dict(x_ptr=bf, w_ptr=bf, m_ptr="*i32", b_ptr=bf, soffs_ptr="*i32", mbits_ptr="*i32", out_ptr=bf,
                  L="i32", H="i32", HEADS="i32", D="i32", W_WORDS="i32", T="i32", qk_scale="fp32", smb="i32",
                  WPR="i32")
    for blocks, w, s, pin in cfgs(ka._qkv_attn_kernel):
        yield (f"qkv_attention D=32 {blocks}", ka._qkv_attn_kernel, qa_sig,
               dict(HAS_BIAS=True, HAS_MASK=True, CAUSAL=True, ALIGNED=True, TF32=False, BLOCK_T=64, BLOCK_L=128,
                    BLOCK_D=32, **blocks), w, s, pin)
    # launched without configs: Triton's defaults
    yield ("dropout keep mask", ka._keep_mask_kernel, dict(out_ptr="*i8", seed_ptr="*i64", L="i32", p_drop="fp32"),
           dict(BLOCK=ka.KEEP_BLOCK), CUDAOptions.num_warps, CUDAOptions.num_stages, True)


def _jit_function(kernel):
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _ptxas_report(ptx: str, arch: int) -> dict:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001  (older Triton layouts: no report, the compile itself still counts)
        return {}
    suffix = "a" if arch >= 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, timeout=120).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None}


def compile_variant(label, kernel, signature, constexprs, num_warps, num_stages, arch=90) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(kernel)
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in constexprs and (sig[n].startswith("*") or n in _DIV16)}
    t0 = time.perf_counter()
    row = {"variant": label, "num_warps": num_warps, "num_stages": num_stages}
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:3000])
        return row
    ttgir = k.asm.get("ttgir", "")
    row.update(ok=True, seconds=round(time.perf_counter() - t0, 2), shared_bytes=k.metadata.shared,
               wgmma="warp_group_dot" in ttgir, async_copies=ttgir.count("async_copy_global_to_local"))
    row.update(_ptxas_report(k.asm["ptx"], arch))
    return row


def _run_header(arch: int) -> dict:
    """What a run was: Triton and ptxas versions, arch, date, machine (the first line of the output)."""
    import datetime
    import platform

    import triton

    head = {"triton": triton.__version__, "arch": arch, "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {platform.platform()}"}
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        head["ptxas"] = re.search(r"release [\d.]+, V([\d.]+)", get_ptxas_version(arch)).group(1)
    except Exception:  # noqa: BLE001  (the version is a label; the compiles themselves are what counts)
        pass
    return head


def markdown(paths) -> str:
    """A table of earlier runs' output (JSON lines, one file per Triton version): per variant and version the
    registers, spilled bytes, shared memory, whether the dots became wgmma and the async copies."""
    runs = []
    for path in paths:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.startswith("{")]
        runs.append((next(r for r in rows if "variant" not in r),
                     {(r["variant"], r["num_warps"], r["num_stages"]): r for r in rows if "variant" in r}))
    out = ["# compile_check results", "",
           "Written by `python -m harmodt_fast.kernels.compile_check --markdown RUN.jsonl...` from the output of",
           "`python -m harmodt_fast.kernels.compile_check --all` (compiled on the CPU, no GPU involved), one run per",
           "Triton version. *pinned*: the kernel's configs[0], the only config that `HARMODT_FAST_AUTOTUNE=0`",
           "launches (the default variants of compile_check). Per version: registers per thread, bytes spilled,",
           "shared memory, whether the matmuls became Hopper wgmma, async copies (loads pipelined into shared memory).",
           ""]
    out += [f"- Triton {h['triton']} (ptxas {h.get('ptxas', '?')}), sm_{h['arch']}, {h['date']}, on {h['machine']}"
            for h, _ in runs]
    out += ["", "| variant | pinned | warps | stages | " + " | ".join(
        f"{h['triton']}: regs | spill B | smem KiB | wgmma | async" for h, _ in runs) + " |",
            "|---" * (4 + 5 * len(runs)) + "|"]
    for key in dict.fromkeys(key for _, rows in runs for key in rows):
        label, warps, stages = key
        pinned = any(rows[key].get("pinned") for _, rows in runs if key in rows)
        cells = [label.replace("|", "/"), "✓" if pinned else "", str(warps), str(stages)]
        for _, rows in runs:
            r = rows.get(key)
            if r is None or not r["ok"]:
                cells += ["not run" if r is None else "FAILED"] + [""] * 4
            else:
                cells += [str(r.get("registers")), str(r.get("spill_bytes")), f"{r['shared_bytes'] / 1024:.0f}",
                          "yes" if r["wgmma"] else "no", str(r["async_copies"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compile the harmodt_fast kernels for a GPU arch, no GPU needed")
    ap.add_argument("--arch", type=int, default=90, help="SM version, 90 = H100/H200")
    ap.add_argument("--all", action="store_true", help="every autotune config, not only each kernel's first")
    ap.add_argument("--markdown", nargs="+", metavar="RUN_JSONL",
                    help="print a markdown table of earlier runs' output instead of compiling")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown), end="")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    print(json.dumps(_run_header(args.arch)), flush=True)
    failed = 0
    for label, kernel, sig, consts, w, s, pinned in _variants(args.all):
        row = compile_variant(label, kernel, sig, consts, w, s, args.arch)
        row["pinned"] = pinned
        failed += not row["ok"]
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
