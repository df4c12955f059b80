"""HarmoDT: a Prompt-DT backbone whose transformer-block projections are task-masked.

Tokens per timestep are interleaved (return-to-go, state, action) with a learned timestep embedding added;
a trajectory prompt (its own embedding layers) is prepended; GPT-2 blocks without positional embeddings; the
action of step i is predicted from the hidden state of step i's state token. The QKV, attention-output, MLP-in
and MLP-out projections of every block are MaskedLinear layers: rows of task t use W ⊙ M_t. Embeddings, layer
norms and heads are shared and unmasked.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from harmodt_fast import ops
from harmodt_fast.batch import Batch
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.masks import TaskMasks
from harmodt_fast.ops._dispatch import runs_fused
from harmodt_fast.ops.harmony_rows import Candidates, apply_candidates
from harmodt_fast.ops.masked_attention import AttentionMask


class MaskedLinear(nn.Linear):
    """Drop-in for nn.Linear (weight [out, in]) with per-task binary masks.

    Without masks (`masks_packed` is None) it is exactly nn.Linear. With masks, forward needs `task_offsets`
    (rows of x per task, over dim 0). Set `task_grads` to a float32 [T, out, in] buffer to have backward add each
    task's dense gradient dY_tᵀX_t into it (one backward gives every task's gradient for the mask update).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("masks_packed", None)
        self.backend = backend
        self.task_grads: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, task_offsets=None) -> torch.Tensor:
        if self.masks_packed is None:
            return F.linear(x, self.weight, self.bias)
        if task_offsets is None:
            raise ValueError("MaskedLinear has task masks: forward needs task_offsets (rows of x per task)")
        return ops.masked_linear(x, self.weight, self.bias, self.masks_packed, task_offsets,
                                 backend=self.backend, task_grads=self.task_grads)


class Dropout(nn.Dropout):
    """nn.Dropout through hf.ops.dropout: on the CPU the parallel C++ mask ("cpp"), elsewhere torch's. A model on
    backend="torch" (the reference) keeps torch's."""

    def __init__(self, p: float, backend: str = "auto"):
        super().__init__(p)
        self.backend = "torch" if backend == "torch" else "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dropout(x, self.p, self.training, backend=self.backend)


class Attention(nn.Module):
    def __init__(self, cfg: HarmoDTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.c_attn = MaskedLinear(cfg.hidden, 3 * cfg.hidden, backend=cfg.backend)
        self.c_proj = MaskedLinear(cfg.hidden, cfg.hidden, backend=cfg.backend)
        self.dropout = cfg.dropout
        self.resid_dropout = Dropout(cfg.dropout, cfg.backend)
        # GPT-2 blocks are causal (HarmoDT builds its masks inside the causal triangle); the fused Triton path
        # also skips the key blocks after each query block
        self.causal = True

    def forward(self, x, task_offsets, attn_mask):
        if self.c_attn.masks_packed is not None and runs_fused("masked_attention", self.c_attn.backend, x.device):
            y = ops.masked_attention(x, self.c_attn.weight, self.c_attn.bias, self.c_attn.masks_packed, task_offsets,
                                     self.heads, attn_mask=attn_mask, causal=self.causal,
                                     dropout_p=self.dropout if self.training else 0.0, backend=self.c_attn.backend,
                                     task_grads=self.c_attn.task_grads)
            return self.resid_dropout(self.c_proj(y, task_offsets))
        B, L, H = x.shape
        q, k, v = self.c_attn(x, task_offsets).split(H, dim=2)
        q, k, v = (t.view(B, L, self.heads, H // self.heads).transpose(1, 2) for t in (q, k, v))
        mask = attn_mask.mask if isinstance(attn_mask, AttentionMask) else attn_mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, L, H)
        return self.resid_dropout(self.c_proj(y, task_offsets))


class MLP(nn.Module):
    def __init__(self, cfg: HarmoDTConfig):
        super().__init__()
        self.c_fc = MaskedLinear(cfg.hidden, cfg.mlp_hidden, backend=cfg.backend)
        self.c_proj = MaskedLinear(cfg.mlp_hidden, cfg.hidden, backend=cfg.backend)
        self.activation = cfg.activation
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        self.dropout = Dropout(cfg.dropout, cfg.backend)

    def forward(self, x, task_offsets):
        fc, proj = self.c_fc, self.c_proj
        masked = fc.masks_packed is not None and proj.masks_packed is not None
        if masked and runs_fused("masked_mlp", fc.backend, x.device):
            y = ops.masked_mlp(x, fc.weight, fc.bias, fc.masks_packed, proj.weight, proj.bias, proj.masks_packed,
                               task_offsets, activation=self.activation, backend=fc.backend,
                               task_grads1=fc.task_grads, task_grads2=proj.task_grads)
            return self.dropout(y)
        return self.dropout(self.c_proj(self.act(self.c_fc(x, task_offsets)), task_offsets))


class Block(nn.Module):
    def __init__(self, cfg: HarmoDTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg)

    def forward(self, x, task_offsets, attn_mask):
        x = x + self.attn(self.ln_1(x), task_offsets, attn_mask)
        return x + self.mlp(self.ln_2(x), task_offsets)


class StepEmbedding(nn.Module):
    """Embeds (return-to-go, state, action) of each timestep into 3 tokens, with the timestep embedding added."""

    def __init__(self, cfg: HarmoDTConfig):
        super().__init__()
        self.timestep = nn.Embedding(cfg.max_ep_len, cfg.hidden)
        self.ret = nn.Linear(1, cfg.hidden)
        self.state = nn.Linear(cfg.state_dim, cfg.hidden)
        self.action = nn.Linear(cfg.act_dim, cfg.hidden)

    def forward(self, states, actions, returns_to_go, timesteps):
        t = self.timestep(timesteps)
        tokens = torch.stack([self.ret(returns_to_go) + t, self.state(states) + t, self.action(actions) + t], dim=2)
        return tokens.flatten(1, 2)  # [B, 3K, H] in (R, s, a) order


class HarmoDT(nn.Module):
    def __init__(self, config: HarmoDTConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = StepEmbedding(cfg)
        self.prompt_embed = StepEmbedding(cfg) if cfg.use_prompt else None
        self.embed_ln = nn.LayerNorm(cfg.hidden)
        self.drop = Dropout(cfg.dropout, cfg.backend)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.predict_action = nn.Sequential(nn.Linear(cfg.hidden, cfg.act_dim), nn.Tanh())
        # as published: GPT-2's N(0, 0.02) init inside the blocks only; embeddings and heads keep PyTorch's
        # defaults (so the timestep embedding starts N(0, 1))
        self.blocks.apply(self._init_weights)
        if cfg.use_masks:
            self.set_masks(TaskMasks.erk(self, cfg.num_tasks, cfg.density, seed=cfg.seed))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # masks -------------------------------------------------------------------------------------------------------
    def masked_layers(self) -> dict[str, MaskedLinear]:
        return {f"{n}.weight": m for n, m in self.named_modules() if isinstance(m, MaskedLinear)}

    def set_masks(self, masks: TaskMasks | None) -> None:
        """Copies `masks` into the layers' buffers (None removes masking)."""
        layers = self.masked_layers()
        if masks is None:
            for layer in layers.values():
                layer.masks_packed = None
            return
        if set(masks.names) != set(layers):
            raise ValueError(f"masks cover {sorted(masks.names)} but the model's masked weights are {sorted(layers)}")
        for name, layer in layers.items():
            if masks.shapes[name] != tuple(layer.weight.shape):
                raise ValueError(f"mask {name} has shape {masks.shapes[name]}, weight is {tuple(layer.weight.shape)}")
            layer.masks_packed = masks.packed(name).to(layer.weight.device).clone()

    def task_masks(self) -> TaskMasks | None:
        layers = self.masked_layers()
        if any(layer.masks_packed is None for layer in layers.values()):
            return None
        return TaskMasks({n: tuple(l.weight.shape) for n, l in layers.items()},
                         {n: l.masks_packed for n, l in layers.items()})

    def masked_sizes(self) -> list[int]:
        """Entries of each masked weight, in model order: the layout of every flat [P] vector of the mask update."""
        return [layer.weight.numel() for layer in self.masked_layers().values()]

    def masked_weights_flat(self) -> torch.Tensor:
        """The masked weights flattened and concatenated in model order, float32 [P] (a copy)."""
        return torch.cat([layer.weight.detach().flatten() for layer in self.masked_layers().values()]).float()

    @contextlib.contextmanager
    def recording_task_grads(self, first: int, last: int, out: torch.Tensor):
        """Inside: a forward and backward over tasks first..last-1's rows (`batch.task_slice(first, last)`) adds
        each task's gradient of its own loss w.r.t. its effective weights into out [last-first, P] (float32,
        zeroed here; layout of `masked_weights_flat`). The masked weights' own .grad is not computed (it would be
        Σ_t M_t ⊙ G_t, unused here). The layers are restored on exit."""
        layers = self.masked_layers()
        saved = {name: layer.masks_packed for name, layer in layers.items()}
        out.zero_()
        start = 0
        for name, layer in layers.items():
            n = layer.weight.numel()
            layer.masks_packed = saved[name][first:last]  # tasks first..last-1 become 0..G-1
            layer.task_grads = out[:, start : start + n].view(last - first, *layer.weight.shape)
            layer.weight.requires_grad_(False)
            start += n
        try:
            yield out
        finally:
            for name, layer in layers.items():
                layer.masks_packed, layer.task_grads = saved[name], None
                layer.weight.requires_grad_(True)

    def apply_mask_flips(self, k: Sequence[int], candidates: Candidates) -> dict[str, torch.Tensor]:
        """In place, in the layers' masks: task t's k[t] best prune candidates off and its k[t] best regrow
        candidates on (indices into the flat [P] layout); returns the update's statistics (hf.ops.harmony_update's)."""
        layers = self.masked_layers().values()
        return apply_candidates([layer.masks_packed for layer in layers], self.masked_sizes(), k, candidates)

    # forward -----------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> torch.Tensor:
        """Predicted actions [B, K, act_dim] for a batch whose rows are grouped by task."""
        cfg = self.config
        # only the trajectory tokens pass through the embedding LayerNorm, the prompt's do not (as published)
        tokens = self.embed_ln(self.embed(batch.states, batch.actions, batch.returns_to_go, batch.timesteps))
        valid = batch.attention_mask.bool().repeat_interleave(3, dim=1)
        if self.prompt_embed is not None:
            if batch.prompt is None:
                raise ValueError(f"method {cfg.method!r} uses a prompt but the batch has none")
            p = batch.prompt
            prompt_tokens = self.prompt_embed(p.states, p.actions, p.returns_to_go, p.timesteps)
            tokens = torch.cat([prompt_tokens, tokens], dim=1)
            valid = torch.cat([p.attention_mask.bool().repeat_interleave(3, dim=1), valid], dim=1)
        x = self.drop(tokens)
        L = x.shape[1]
        # causal, padded keys hidden; every token still sees itself so fully padded rows stay finite
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        attn_mask = (causal & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=x.device)
        attn_mask = AttentionMask(attn_mask[:, None])  # [B, 1, L, L], bit-packed once for all blocks if needed
        for block in self.blocks:
            x = block(x, batch.task_offsets, attn_mask)
        x = self.ln_f(x)
        state_tokens = x[:, L - 3 * cfg.context + 1 :: 3]
        return self.predict_action(state_tokens)

    def task_losses(self, batch: Batch, action_preds: torch.Tensor | None = None) -> torch.Tensor:
        """Per-task mean squared action error over valid steps, [T'] for the T' segments of task_offsets
        (0 for an empty segment). For one of n slices of a data-parallel batch (batch.global_task_steps set) the
        error is divided by the task's valid steps in the whole batch and multiplied by n, so that the mean over
        the n processes (what DDP averages) is the loss one process would compute on the whole batch."""
        preds = self(batch) if action_preds is None else action_preds
        valid = batch.attention_mask.to(preds.dtype)
        sq = ((preds.float() - batch.actions.float()) ** 2).sum(-1) * valid  # [B, K]
        num_tasks = len(batch.task_offsets) - 1  # a tensor, or host ints under torch.compile
        ids = batch.task_ids
        err = torch.zeros(num_tasks, device=preds.device).index_add_(0, ids, sq.sum(1))
        if batch.global_task_steps is not None:
            return err * batch.num_slices / (batch.global_task_steps * self.config.act_dim).clamp_min(1)
        count = torch.zeros(num_tasks, device=preds.device).index_add_(0, ids, valid.float().sum(1))
        return err / (count * self.config.act_dim).clamp_min(1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _NoRandomInit(torch.overrides.TorchFunctionMode):
    """Skips random initialisers on meta tensors: there are no values to fill, and the first normal_ on meta
    costs seconds (it imports the meta kernels)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tensor = args[0] if args else (kwargs or {}).get("tensor")  # torch.nn.init passes it by keyword
        if getattr(func, "__name__", "") in ("normal_", "uniform_") and getattr(tensor, "is_meta", False):
            return tensor
        return func(*args, **(kwargs or {}))


def meta_model(config: HarmoDTConfig) -> HarmoDT:
    """HarmoDT(config)'s modules on the meta device: shapes only (no memory, no random draws, no masks drawn, so
    the masked layers have no masks_packed)."""
    with torch.device("meta"), _NoRandomInit():
        return HarmoDT(HarmoDTConfig.from_dict({**config.to_dict(), "method": "prompt-dt"}) if config.use_masks
                       else config)
