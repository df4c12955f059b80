import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.batch import synthetic_batch


def tiny(num_tasks=3, **kw):
    return hf.HarmoDTConfig.from_preset("tiny", num_tasks=num_tasks, dropout=0.0, **kw)


def test_paper_model_size():
    with torch.device("meta"):
        model = hf.HarmoDT(hf.HarmoDTConfig.from_preset("paper", method="prompt-dt"))
    n = model.num_parameters()
    print(f"paper preset: {n} parameters")
    assert abs(n - 5.29e6) / 5.29e6 < 0.005
    assert hf.HarmoDTConfig.from_preset("paper").tokens_per_sequence == 75


def test_mixed_batch_equals_each_task_alone(rng):
    """One forward over a mixed batch gives each task's rows exactly what a forward of that task alone gives."""
    torch.manual_seed(0)
    cfg = tiny()
    model = hf.HarmoDT(cfg).eval()
    batch = synthetic_batch(cfg, [3, 0, 2], rng)
    mixed = model(batch)
    assert mixed.shape == (5, cfg.context, cfg.act_dim)
    offsets = batch.task_offsets.tolist()
    for t in (0, 2):
        lo, hi = offsets[t], offsets[t + 1]
        counts = [0] * cfg.num_tasks
        counts[t] = hi - lo
        alone = hf.Batch(
            batch.states[lo:hi], batch.actions[lo:hi], batch.returns_to_go[lo:hi], batch.timesteps[lo:hi],
            batch.attention_mask[lo:hi], hf.batch.offsets_from_counts(counts),
            hf.Prompt(*(getattr(batch.prompt, f)[lo:hi] for f in
                        ("states", "actions", "returns_to_go", "timesteps", "attention_mask"))),
        )
        torch.testing.assert_close(model(alone), mixed[lo:hi], rtol=1e-5, atol=1e-6)
    # and the masks matter: task 0's rows under task 2's mask differ
    swapped = hf.Batch(batch.states[:3], batch.actions[:3], batch.returns_to_go[:3], batch.timesteps[:3],
                       batch.attention_mask[:3], torch.tensor([0, 0, 0, 3]),
                       hf.Prompt(*(getattr(batch.prompt, f)[:3] for f in
                                   ("states", "actions", "returns_to_go", "timesteps", "attention_mask"))))
    assert not torch.allclose(model(swapped), mixed[:3])


def test_gradient_touches_only_masked_entries(rng):
    cfg = tiny(num_tasks=2)
    model = hf.HarmoDT(cfg)
    batch = synthetic_batch(cfg, [0, 4], rng)  # only task 1 has rows
    model.task_losses(batch).sum().backward()
    masks = model.task_masks()
    for name, layer in model.masked_layers().items():
        inactive = ~masks.to_dense(name, 1)
        assert torch.all(layer.weight.grad[inactive] == 0), name
        assert layer.weight.grad[~inactive].abs().sum() > 0, name


def test_task_losses_shape_and_empty_segment(rng):
    cfg = tiny()
    model = hf.HarmoDT(cfg)
    batch = synthetic_batch(cfg, [2, 0, 3], rng)
    losses = model.task_losses(batch)
    assert losses.shape == (3,) and losses[1] == 0 and torch.all(losses[[0, 2]] > 0)


@pytest.mark.parametrize("method", ["prompt-dt", "mtdt"])
def test_unmasked_methods(method, rng):
    cfg = tiny(method=method)
    model = hf.HarmoDT(cfg)
    assert model.task_masks() is None
    batch = synthetic_batch(cfg, 2, rng)
    if method == "mtdt":
        assert model.prompt_embed is None
    assert torch.isfinite(model.task_losses(batch)).all()


def test_masked_layer_needs_offsets():
    layer = hf.MaskedLinear(8, 4)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    layer.masks_packed = hf.ops.pack_masks(torch.ones(2, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="task_offsets"):
        layer(x)
    torch.testing.assert_close(layer(x, torch.tensor([0, 1, 3])), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        hf.HarmoDTConfig.from_preset("huge")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['hiden'\]"):
        hf.HarmoDTConfig.from_preset("tiny", hiden=3)
    with pytest.raises(ValueError, match="multiple of heads"):
        hf.HarmoDTConfig.from_preset("tiny", hidden=65)
    with pytest.raises(ValueError, match="unknown method"):
        hf.HarmoDTConfig.from_preset("tiny", method="dt")
    cfg = hf.HarmoDTConfig.from_preset("tiny", tasks=["reach-v3", "push-v3"])
    assert cfg.num_tasks == 2
    assert hf.HarmoDTConfig.from_dict(cfg.to_dict()) == cfg
    large = hf.HarmoDTConfig.from_preset("large")
    assert (large.hidden, large.layers, large.heads) == (1024, 12, 16)


def test_cli_info(capsys):
    from harmodt_fast.cli import main

    assert main(["info", "--preset", "paper", "--tasks", "50", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"mask_bytes_packed": 29491200' in out and '"parameters": 5276676' in out
