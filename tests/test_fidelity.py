"""Where the published HarmoDT code fixes a detail, we do the same (see the README's list of deliberate differences
for the ones we do not)."""
import math

import torch

import harmodt_fast as hf
from harmodt_fast.batch import SyntheticSampler, synthetic_batch
from harmodt_fast.trainer import Trainer


def tiny(**kw):
    base = dict(num_tasks=3, steps=12, mask_interval=1000, log_every=100, checkpoint_every=100, precision="fp32")
    base.update(kw)
    return hf.HarmoDTConfig.from_preset("tiny", **base)


def test_round_robin_step_moves_only_the_tasks_own_mask(tmp_path):
    """A step of task t changes only entries where M_t = 1: weight decay and the Adam momentum that earlier
    tasks' steps left on the other entries are undone, as in the published code."""
    config = tiny(schedule="round-robin", weight_decay=0.1, density=0.5)
    trainer = Trainer(config, SyntheticSampler(config), str(tmp_path), torch.device("cpu"), "synthetic")
    masks = trainer.model.task_masks()
    checked = 0
    for step in range(2 * config.num_tasks):
        before = {n: l.weight.detach().clone() for n, l in trainer.model.masked_layers().items()}
        trainer._train_step()
        task = trainer.step % config.num_tasks
        trainer.step += 1
        for name, layer in trainer.model.masked_layers().items():
            inactive = ~masks.to_dense(name, task)
            assert torch.equal(layer.weight.detach()[inactive], before[name][inactive]), (step, name)
            assert not torch.equal(layer.weight.detach()[~inactive], before[name][~inactive]), (step, name)
            checked += int(inactive.sum())
    assert checked > 0


def test_prompt_tokens_skip_the_embedding_layernorm():
    """Only the trajectory tokens pass through embed_ln: changing its gain moves the trajectory part of the
    transformer input, not the prompt part."""
    config = tiny(method="prompt-dt", dropout=0.0)
    torch.manual_seed(0)
    model = hf.HarmoDT(config).eval()
    batch = synthetic_batch(config, 2)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach().clone()))
    model(batch)
    first = seen.pop("x")
    with torch.no_grad():
        model.embed_ln.weight.mul_(3.0)
    model(batch)
    second = seen.pop("x")
    n_prompt = 3 * config.prompt_len
    assert torch.equal(first[:, :n_prompt], second[:, :n_prompt])
    assert not torch.allclose(first[:, n_prompt:], second[:, n_prompt:])


def test_initialisation_as_published():
    """N(0, 0.02) inside the GPT-2 blocks; PyTorch's defaults for embeddings and heads (timestep embedding N(0, 1))."""
    torch.manual_seed(0)
    model = hf.HarmoDT(hf.HarmoDTConfig.from_preset("paper", num_tasks=2))
    block_std = torch.cat([m.weight.flatten() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]).std()
    assert abs(block_std.item() - 0.02) < 0.001
    assert all(float(m.bias.abs().max()) == 0.0 for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    assert abs(model.embed.timestep.weight.std().item() - 1.0) < 0.01
    # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
    head = model.predict_action[0]
    bound = 1 / math.sqrt(head.in_features)
    assert head.weight.abs().max() <= bound and head.weight.std() > 0.5 * bound / math.sqrt(3)
    assert head.bias.abs().max() > 0


def test_consensus_threshold_defaults_to_half_the_tasks():
    assert hf.HarmoDTConfig(num_tasks=50).consensus_threshold == 25
    assert hf.HarmoDTConfig(num_tasks=5).consensus_threshold == 2
    assert hf.HarmoDTConfig(num_tasks=1).consensus_threshold == 1
    assert hf.HarmoDTConfig(num_tasks=5, merge_threshold=4).consensus_threshold == 4
