"""HarmoDT with its masked layers on the Triton backend (fused attention and MLP blocks) against the same model
on the plain-PyTorch backend: outputs, every parameter gradient and the per-task gradient buffers."""
import torch

import harmodt_fast as hf
from harmodt_fast.batch import synthetic_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def set_backend(model, backend):
    for layer in model.masked_layers().values():
        layer.backend = backend


def attach_task_grads(model):
    """Each layer's buffer is its column slice of one [T, P] buffer, as the trainer's mask update lays them out
    (so the fused blocks' backward must take the task stride)."""
    layers = model.masked_layers()
    sizes = [layer.weight.numel() for layer in layers.values()]
    flat = torch.zeros(model.config.num_tasks, sum(sizes), device=DEVICE)
    bufs, start = {}, 0
    for (name, layer), n in zip(layers.items(), sizes):
        layer.task_grads = flat[:, start : start + n].view(model.config.num_tasks, *layer.weight.shape)
        bufs[name] = layer.task_grads
        start += n
    return bufs


def test_model_triton_backend_matches_torch_backend(rng):
    # one block keeps the interpreter quick; GELU is covered by test_masked_mlp.py
    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=3, dropout=0.0, layers=1)
    torch.manual_seed(0)
    model = hf.HarmoDT(cfg).to(DEVICE)
    batch = synthetic_batch(cfg, [2, 0, 3], rng, device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        set_backend(model, backend)
        model.zero_grad()
        bufs = attach_task_grads(model)
        loss = model.task_losses(batch).sum()
        if backend == "triton":
            assert hf.ops.last_backend("masked_attention") == "triton"
            assert hf.ops.last_backend("masked_mlp") == "triton"
            assert hf.ops.last_backend("masked_linear") == "triton"  # the attention output projection
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (loss.detach(), grads, {n: b.clone() for n, b in bufs.items()})
    (loss_t, grads_t, tg_t), (loss_r, grads_r, tg_r) = results["triton"], results["torch"]
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-6)
    assert grads_t.keys() == grads_r.keys()
    for name in grads_r:
        scale = max(1e-3, grads_r[name].abs().max().item())
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-4, atol=1e-4 * scale, msg=name)
    for name in tg_r:
        assert tg_r[name].abs().sum() > 0, name
        scale = tg_r[name].abs().max().item()
        torch.testing.assert_close(tg_t[name], tg_r[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_model_eval_uses_fused_inference_kernels(rng):
    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=2)
    model = hf.HarmoDT(cfg).to(DEVICE).eval()
    batch = synthetic_batch(cfg, [1, 2], rng, device=DEVICE)
    with torch.no_grad():
        set_backend(model, "torch")
        want = model(batch)
        set_backend(model, "triton")
        got = model(batch)
    assert hf.ops.last_backend("masked_attention") == "triton"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_model_training_with_dropout_runs_on_triton(rng):
    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=2, dropout=0.1, layers=1)
    model = hf.HarmoDT(cfg).to(DEVICE).train()
    set_backend(model, "triton")
    batch = synthetic_batch(cfg, [2, 1], rng, device=DEVICE)
    loss = model.task_losses(batch).sum()
    assert hf.ops.last_backend("masked_attention") == "triton"
    loss.backward()
    grad = model.blocks[0].attn.c_attn.weight.grad
    assert torch.isfinite(loss) and grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_attention_mask_is_packed_once_per_forward(rng, monkeypatch):
    from harmodt_fast.kernels import masked_attention as kattn

    packs = []
    real = kattn.pack_attention_mask
    monkeypatch.setattr(kattn, "pack_attention_mask", lambda m: packs.append(m.shape) or real(m))
    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=2, layers=2, hidden=32, mlp_hidden=64, context=3,
                                       backend="triton")
    model = hf.HarmoDT(cfg).to(DEVICE).eval()
    with torch.no_grad():
        model(synthetic_batch(cfg, [1, 2], rng, device=DEVICE))
    assert hf.ops.last_backend("masked_attention") == "triton"
    assert len(packs) == 1  # two blocks, one packing


def test_task_ids_are_built_once_per_offsets():
    from harmodt_fast.batch import Batch

    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=3)
    a, b = (synthetic_batch(cfg, [2, 0, 3], torch.Generator().manual_seed(s)) for s in (1, 2))
    assert a.task_ids is b.task_ids  # same offsets: the same cached tensor, no per-step rebuild
    assert a.task_ids.tolist() == [0, 0, 2, 2, 2]
    rows = torch.tensor([1, 1, 1, 0, 0])
    assert Batch(**{**a.__dict__, "row_tasks": rows}).task_ids is rows  # a sampler's own ids are used as they are
