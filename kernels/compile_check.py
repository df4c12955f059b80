"""Compiles the kernels for an NVIDIA GPU without one: Triton's CUDA backend lowers to PTX and runs ptxas on the
host, so type errors, unsupported ops, shared-memory overflows and register spills show up on any machine.

    python -m harmodt_fast.kernels.compile_check            # representative variants, sm_90 (H100/H200)
    python -m harmodt_fast.kernels.compile_check --all      # every autotune config of every kernel

Must run WITHOUT TRITON_INTERPRET (the interpreter replaces the compiler). Prints one JSON line per variant with
registers, spilled bytes, shared memory and whether the matmuls became wgmma; exits 1 if any variant fails.
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
    from harmodt_fast.kernels import masked_attention as ka
    from harmodt_fast.kernels import masked_linear as kl
    from harmodt_fast.kernels import masked_mlp as km

    def cfgs(kernel, default):
        if not full:
            return [default]
        return [(c.kwargs, c.num_warps, c.num_stages) for c in kernel.configs]

    bf = "*bf16"
    mm_sig = dict(a_ptr=bf, w_ptr=bf, m_ptr="*i32", offs_ptr="*i32", bias_ptr=bf, aux_ptr=bf, out_ptr=bf, pre_ptr=bf,
                  M="i32", R="i32", C="i32", LD="i32", W_WORDS="i32", T="i32", M_BUCKET="i32")
    mm_default = [(dict(BLOCK_M=128, BLOCK_R=64, BLOCK_C=128, SWAP=sw), 8, 3) for sw in (True, False)]
    for blocks, w, s in (cfgs(kl._masked_mm_kernel, None) if full else mm_default):
        for contig, epi, act, pre in [(True, 0, 0, False), (False, 0, 0, False), (True, 1, 2, True),
                                      (False, 2, 1, False)]:
            yield (f"masked_mm contig_r={contig} epi={epi} act={act} {blocks}", kl._masked_mm_kernel, mm_sig,
                   dict(CONTIG_R=contig, ALIGNED=True, HAS_BIAS=contig, EPI=epi, ACT=act, STORE_PRE=pre, TF32=False,
                        BLOCK_T=64, **blocks), w, s)
    yield ("masked_mm unaligned rows", kl._masked_mm_kernel, mm_sig,
           dict(CONTIG_R=True, ALIGNED=False, HAS_BIAS=True, EPI=0, ACT=0, STORE_PRE=False, TF32=False, BLOCK_T=16,
                BLOCK_M=64, BLOCK_R=32, BLOCK_C=64, SWAP=True), 4, 3)
    dw_sig = dict(dy_ptr=bf, x_ptr=bf, m_ptr="*i32", offs_ptr="*i32", dw_ptr="*fp32", db_ptr="*fp32", tg_ptr="*fp32",
                  M="i32", N="i32", K="i32", W_WORDS="i32", T="i32", ROWS_PER_SPLIT="i32", TASKS_PER_SPLIT="i32",
                  M_BUCKET="i32", TG_STRIDE="i32")
    for blocks, w, s in cfgs(kl._masked_dw_kernel, (dict(BLOCK_M=64), 8, 3)):
        for tile, split_tg in [((128, 128), False), ((64, 64), True)]:
            yield (f"masked_dw tile={tile} task_grads={split_tg} {blocks}", kl._masked_dw_kernel, dw_sig,
                   dict(TASK_SPLIT=split_tg, HAS_DW=True, HAS_DB=True, HAS_TG=split_tg, ALIGNED=True, TF32=False,
                        BLOCK_N=tile[0], BLOCK_K=tile[1], **blocks), w, s)
    # fp32 (the CPU-default precision, and precision="fp32" on a GPU): TF32 and full-precision dots, the dW kernel
    # with task grads; named "fp32 ..." since full-precision fp32 dots are not wgmma
    as_fp32 = lambda sig: {k: ("*fp32" if v == bf else v) for k, v in sig.items()}  # noqa: E731
    for tf32 in (True, False):
        yield (f"fp32 masked_mm tf32={tf32}", kl._masked_mm_kernel, as_fp32(mm_sig),
               dict(CONTIG_R=True, ALIGNED=True, HAS_BIAS=True, EPI=0, ACT=0, STORE_PRE=False, TF32=tf32, BLOCK_T=64,
                    BLOCK_M=128, BLOCK_R=64, BLOCK_C=128, SWAP=True), 8, 3)
    yield ("fp32 masked_dw task_grads=True", kl._masked_dw_kernel, as_fp32(dw_sig),
           dict(TASK_SPLIT=True, HAS_DW=True, HAS_DB=True, HAS_TG=True, ALIGNED=True, TF32=False, BLOCK_N=64,
                BLOCK_K=64, BLOCK_M=64), 8, 3)
    ch_sig = dict(a_ptr=bf, w1_ptr=bf, m1_ptr="*i32", w2_ptr=bf, m2_ptr="*i32", offs_ptr="*i32", b1_ptr=bf,
                  b2_ptr=bf, aux_ptr=bf, mid_ptr=bf, pre_ptr=bf, out_ptr=bf, M="i32", D_IN="i32", D_MID="i32",
                  D_OUT="i32", LD1="i32", LD2="i32", W1_WORDS="i32", W2_WORDS="i32", T="i32", M_BUCKET="i32")
    for blocks, w, s in cfgs(km._masked_chain_kernel, (dict(BLOCK_M=64, BLOCK_K=64, BLOCK_H=64), 8, 2)):
        for bwd in (False, True):
            yield (f"masked_chain backward={bwd} {blocks}", km._masked_chain_kernel, ch_sig,
                   dict(BACKWARD=bwd, CONTIG=not bwd, ALIGNED1=True, ALIGNED2=True, HAS_B1=not bwd, HAS_B2=not bwd,
                        ACT=1, STORE_MID=True, STORE_PRE=False, TF32=False, BLOCK_T=64, BLOCK_OUT=256, **blocks), w, s)
    fwd_sig = dict(qkv_ptr=bf, mbits_ptr="*i32", out_ptr=bf, lse_ptr="*fp32", L="i32", H="i32", HEADS="i32",
                   D="i32", qk_scale="fp32", smb="i32", WPR="i32", seed_ptr="*i64", p_drop="fp32")
    for blocks, w, s in cfgs(ka._attn_fwd_kernel, (dict(BLOCK_M=128, BLOCK_N=64), 8, 2)):
        for d, drop in [(32, True), (64, False)]:
            yield (f"attention_fwd D={d} dropout={drop} {blocks}", ka._attn_fwd_kernel, fwd_sig,
                   dict(HAS_MASK=True, CAUSAL=True, DROPOUT=drop, BLOCK_D=d, **blocks), w, s)
    bwd_sig = dict(do_ptr=bf, qkv_ptr=bf, out_ptr=bf, lse_ptr="*fp32", mbits_ptr="*i32", dqkv_ptr=bf, L="i32",
                   H="i32", HEADS="i32", D="i32", sm_scale="fp32", qk_scale="fp32", smb="i32", WPR="i32",
                   seed_ptr="*i64", p_drop="fp32")
    for blocks, w, s in cfgs(ka._attn_bwd_kernel, (dict(BLOCK_M=32, BLOCK_N=64), 4, 2)):
        for d, drop in [(32, True), (64, False)]:
            yield (f"attention_bwd D={d} dropout={drop} {blocks}", ka._attn_bwd_kernel, bwd_sig,
                   dict(HAS_MASK=True, CAUSAL=True, DROPOUT=drop, BLOCK_D=d, **blocks), w, s)
    qa_sig = dict(x_ptr=bf, w_ptr=bf, m_ptr="*i32", b_ptr=bf, soffs_ptr="*i32", mbits_ptr="*i32", out_ptr=bf,
                  L="i32", H="i32", HEADS="i32", D="i32", W_WORDS="i32", T="i32", qk_scale="fp32", smb="i32",
                  WPR="i32")
    for blocks, w, s in cfgs(ka._qkv_attn_kernel, (dict(BLOCK_K=64), 4, 2)):
        yield (f"qkv_attention D=32 {blocks}", ka._qkv_attn_kernel, qa_sig,
               dict(HAS_BIAS=True, HAS_MASK=True, CAUSAL=True, ALIGNED=True, TF32=False, BLOCK_T=64, BLOCK_L=128,
                    BLOCK_D=32, **blocks), w, s)
    yield ("dropout keep mask", ka._keep_mask_kernel, dict(out_ptr="*i8", seed_ptr="*i64", L="i32", p_drop="fp32"),
           dict(BLOCK=16), 4, 1)


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compile the harmodt_fast kernels for a GPU arch, no GPU needed")
    ap.add_argument("--arch", type=int, default=90, help="SM version, 90 = H100/H200")
    ap.add_argument("--all", action="store_true", help="every autotune config, not one per kernel")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    failed = 0
    for label, kernel, sig, consts, w, s in _variants(args.all):
        row = compile_variant(label, kernel, sig, consts, w, s, args.arch)
        failed += not row["ok"]
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
