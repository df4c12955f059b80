"""What one sequence costs a training step: the tensors HarmoDT's forward keeps for backward and the backward's
temporaries, counted from the model's shapes (harmodt_fast/model.py), for each attention path. hf.plan adds
these up (docs/plan.md has the formulas and how they were checked).

Per sequence: L tokens (3 x (context + prompt)), hidden H, MLP width F, h heads; `a` bytes per element of what
runs under autocast (2 for bf16, 4 for fp32). LayerNorms and the residual stream stay fp32 under autocast.

Attention paths (what the attention keeps differs most between them):
    cpu-math        CPU, dropout > 0: PyTorch's math attention (fp32 inside, also for bf16 inputs): q, k, v
                    and three h x L x L tensors (probabilities, dropout keep-mask, dropped probabilities)
    cpu-flash       CPU, dropout = 0: PyTorch's flash attention for CPUs: q, k, v (views of the QKV output),
                    the output, the log-sum-exp and the attention mask converted to `a`
    cuda-efficient  CUDA without the fused kernels (prompt-dt, mtdt, backend="torch"): PyTorch's memory-efficient
                    attention (flash takes no attention mask): q, k, v, output, log-sum-exp, the mask as a bias
    triton-fused    harmodt with the triton backend (hf.ops.masked_attention, masked_mlp; CUDA, or the CPU under
                    TRITON_INTERPRET=1): qkv, output and log-sum-exp; no L x L tensor at all, backward recomputes
                    the probabilities (flash style)
Dropout keep-masks are bool on CUDA (native dropout) and from hf.ops.dropout on the CPU (backend "torch": a float
tensor of the input's dtype); the math attention's own dropout inside SDPA keeps fp32.
Counted against torch.autograd.graph.saved_tensors_hooks (tests/test_plan.py): cpu-math, cpu-flash and
triton-fused (under the Triton interpreter), fp32 and bf16. Not measured (no GPU here): cuda-efficient, which
follows PyTorch's memory-efficient kernel, and CUDA's bool dropout masks.
"""
from __future__ import annotations

ATTENTION_PATHS = ("cpu-math", "cpu-flash", "cuda-efficient", "triton-fused")
FP32 = 4


def attention_path(config, device_type: str) -> str:
    """The attention path a training step of `config` takes on `device_type` ("cpu" or "cuda")."""
    # the fused kernels run for masked layers with the triton backend ("auto" picks it on CUDA; on the CPU it
    # runs only under TRITON_INTERPRET=1, which is how tests count its saved tensors)
    if config.use_masks and (config.backend == "triton" or (device_type == "cuda" and config.backend == "auto")):
        return "triton-fused"
    if device_type == "cuda":
        return "cuda-efficient"
    # the CPU flash kernel takes no dropout: scaled_dot_product_attention falls back to the math path
    return "cpu-math" if config.dropout > 0 else "cpu-flash"


def _ceil(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _attention_bytes(path: str, L: int, H: int, heads: int, a: int, dropout: bool) -> int:
    """Bytes per sequence one block's attention keeps (besides its QKV input and its output projection's input)."""
    if path == "cpu-math":
        # q, k, v fp32 copies; softmax output, and with dropout its keep-mask and result (all fp32, h x L x L)
        return 3 * L * H * FP32 + (3 if dropout else 1) * heads * L * L * FP32
    if path == "cpu-flash":
        return 3 * L * H * a + heads * L * FP32 + L * L * a
    if path == "cuda-efficient":
        # the boolean mask becomes an additive bias (last dim padded to 16), log-sum-exp padded to 32
        return 3 * L * H * a + heads * _ceil(L, 32) * FP32 + L * _ceil(L, 16) * a
    if path == "triton-fused":
        return 3 * L * H * a + heads * L * FP32
    raise ValueError(f"unknown attention path {path!r}; expected one of {ATTENTION_PATHS}")


def sequence_bytes(config, device_type: str, a: int) -> dict[str, int]:
    """Bytes one sequence keeps from the end of the forward into the backward, by part (the batch's own
    tensors included), on `device_type` with `a` bytes per autocast element."""
    c = config
    path = attention_path(c, device_type)
    L, H, F, heads = c.tokens_per_sequence, c.hidden, c.mlp_hidden, c.heads
    K = c.context
    Kp = c.prompt_len if c.use_prompt else 0
    S, A = c.state_dim, c.act_dim
    dropout = c.dropout > 0
    on_cuda = device_type == "cuda"
    # dropout keep-masks: bool on CUDA (native dropout) and from hf.ops.dropout's cpp backend (the CPU), a float
    # tensor of the input's dtype from torch's CPU dropout (backend="torch")
    keep_bytes = 1 if on_cuda or c.backend != "torch" else a
    per_block = {
        "layer norm inputs (fp32)": 2 * (L * H * FP32 + 2 * L * FP32),  # input, mean and rstd of ln_1 and ln_2
        "projection inputs": 3 * L * H * a,  # of c_attn, attn.c_proj, mlp.c_fc (mlp.c_proj's is the MLP hidden)
        "MLP hidden": (2 if c.activation == "gelu" else 1) * L * F * a,  # GELU keeps its input too
        "attention": _attention_bytes(path, L, H, heads, a, dropout),
        "dropout masks": 2 * L * H * keep_bytes if dropout else 0,  # after attn.c_proj and after the MLP
    }
    parts = {name: c.layers * v for name, v in per_block.items()}
    parts["embeddings"] = (
        3 * K * H * FP32 + 2 * 3 * K * FP32  # the trajectory tokens' LayerNorm (the prompt's tokens skip it)
        + (L * H * (1 if keep_bytes == 1 else FP32) if dropout else 0)  # the token dropout's keep-mask (fp32 tokens)
        + ((K + Kp) * (1 + S + A) * a if a != FP32 else 0)  # inputs of the embedding Linears, cast
    )
    # the action head's input: the state tokens, a copy unless they are a plain view of the final norm's output
    # (no prompt and fp32: then the whole output stays)
    head_input = L * H * FP32 if (Kp == 0 and a == FP32) else K * H * a
    parts["final norm and head"] = L * H * FP32 + 2 * L * FP32 + head_input + K * A * (a + FP32) + K * a
    if path == "triton-fused":
        parts["attention"] += L * _ceil(L, 32) // 8  # the bit-packed attention mask, once for all blocks
    # the batch: states, actions, returns-to-go (fp32), timesteps (int64), attention mask (bool), prompt the same
    parts["batch"] = (K + Kp) * ((S + A + 1) * FP32 + 8 + 1)
    return parts


def backward_temporary_bytes(config, device_type: str, a: int) -> int:
    """Bytes per sequence the backward holds on top of the saved tensors while it runs the last block: two fp32
    gradients of the residual stream and the widest moment of the block, the MLP's (the activation's gradient
    and its input's gradient at once, L x F each) or the attention's (math path: an h x L x L gradient; else the
    q, k, v gradients). An estimate from the backward's order; docs/plan.md has the measurements."""
    c = config
    L, H, F = c.tokens_per_sequence, c.hidden, c.mlp_hidden
    widest_attention = c.heads * L * L * FP32 if attention_path(c, device_type) == "cpu-math" else 3 * L * H * a
    return 2 * L * H * FP32 + max(2 * L * F * a, widest_attention)
