"""hf.export(..., format="onnx" | "torch.export"): per-task dense policies that act like hf.load_policy's Policy in
real Meta-World episodes (onnxruntime and the torch.export program fed the same observations), and their errors."""
import hashlib
import json
import os

import numpy as np
import onnx  # the test extra installs them: a missing one fails here instead of skipping the tests
import onnxruntime as ort
import pytest
import torch

import harmodt_fast as hf
from helpers import POLICY_TASKS, train_tiny_policy_run
from harmodt_fast.cli import main as cli_main
from harmodt_fast.envs import make_env

TASKS = POLICY_TASKS
STEPS = 40  # tiny context K = 5: the window fills, then slides for 35 steps
# fp32 against fp32: the masked model (W ⊙ M inside the matmul) and the folded dense graph sum in other orders;
# the actions are tanh outputs in [-1, 1], so an absolute tolerance of a few fp32 roundings of the activations
ATOL = 2e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_policy_run(tmp_path_factory.mktemp("export_policy"))


def window(history, K):
    """The exported graphs' inputs for one row: the last K steps of `history` (lists per field), left-padded."""
    n = len(history["states"])
    k, pad = min(K, n), K - min(K, n)
    states = np.zeros((K, len(history["states"][0])), np.float32)
    actions = np.zeros((K, 4), np.float32)
    rtg = np.zeros(K, np.float32)
    steps = np.zeros(K, np.int64)
    mask = np.zeros(K, bool)
    states[pad:] = history["states"][n - k:]
    actions[pad:] = history["actions"][n - k:]
    rtg[pad:] = history["rtg"][n - k:]
    steps[pad:] = np.arange(n - k, n)
    mask[pad:] = True
    return states, actions, rtg, steps, mask


def test_onnx_and_torch_export_act_like_the_policy(run, tmp_path, capsys):
    onnx_dir = hf.export(run, tmp_path / "onnx", format="onnx")
    assert cli_main(["export", str(run.checkpoint), str(tmp_path / "pt2"), "--format", "torch.export",
                     "--tasks", "reach-v3"]) == 0
    assert "reach-v3.pt2" in capsys.readouterr().out

    manifest = json.loads(open(os.path.join(onnx_dir, "manifest.json")).read())
    assert sorted(os.listdir(onnx_dir)) == ["button-press-v3.onnx", "manifest.json", "reach-v3.onnx"]
    assert list(manifest["tasks"]) == TASKS and manifest["source"]["step"] == 6 and manifest["kind"] == "onnx"
    assert (manifest["state_dim"], manifest["act_dim"], manifest["context"]) == (39, 4, 5)
    assert [i["name"] for i in manifest["inputs"]] == ["states", "actions", "returns_to_go", "timesteps",
                                                      "attention_mask"]
    pt2_manifest = json.loads(open(tmp_path / "pt2" / "manifest.json").read())
    assert list(pt2_manifest["tasks"]) == ["reach-v3"] and sorted(os.listdir(tmp_path / "pt2")) == [
        "manifest.json", "reach-v3.pt2"]

    sessions = {}
    for task, entry in manifest["tasks"].items():
        path = os.path.join(onnx_dir, entry["file"])
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == entry["sha256"]
        model = onnx.load(path)
        assert {node.domain for node in model.graph.node} <= {""}  # standard ONNX ops only, no custom op
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        sessions[task] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    program = torch.export.load(str(tmp_path / "pt2" / "reach-v3.pt2")).module()

    policy = hf.load_policy(run, device="cpu", precision="fp32")
    K, target, names = manifest["context"], manifest["target_return"], [i["name"] for i in manifest["inputs"]]
    assert target == policy.target_return
    # two reach environments (a batch of 2 rows through one graph) and one button-press, in an order the policy
    # regroups inside
    tasks, goals = ["reach-v3", "button-press-v3", "reach-v3"], [0, 0, 1]
    envs = [make_env(t, g) for t, g in zip(tasks, goals)]
    obs = np.stack([env.reset(seed=i)[0] for i, env in enumerate(envs)])
    history = [{"states": [], "actions": [], "rtg": []} for _ in envs]
    returns = np.zeros(len(envs))
    policy.reset(tasks)
    worst = 0.0
    for _ in range(STEPS):
        for i, h in enumerate(history):
            h["states"].append(obs[i].astype(np.float32))
            h["actions"].append(np.zeros(4, np.float32))  # the step's own action is predicted (ignored as input)
            h["rtg"].append(target - returns[i])
        expected = policy.act(obs)
        for task in TASKS:
            rows = [i for i, t in enumerate(tasks) if t == task]
            inputs = [np.stack(f) for f in zip(*(window(history[i], K) for i in rows))]
            got = sessions[task].run(None, dict(zip(names, inputs)))[0]
            assert got.shape == (len(rows), 4) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected[rows], rtol=0, atol=ATOL)
            worst = max(worst, float(np.abs(got - expected[rows]).max()))
            if task == "reach-v3":
                with torch.no_grad():
                    got_pt2 = program(*(torch.from_numpy(x) for x in inputs)).numpy()
                np.testing.assert_allclose(got_pt2, expected[rows], rtol=0, atol=ATOL)
        stepped = [env.step(np.clip(expected[i].astype(np.float64), -1, 1)) for i, env in enumerate(envs)]
        for i, h in enumerate(history):
            h["actions"][-1] = expected[i]
        obs = np.stack([s[0] for s in stepped])
        rewards = np.array([s[1] for s in stepped])
        returns += rewards
        policy.observe(rewards)
    assert len({tuple(np.round(h["actions"][-1], 3)) for h in history}) == 3  # the rows really differ
    print(f"largest |onnx - policy| over {STEPS} steps: {worst:.2e}")


def test_export_errors_name_the_problem(run, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'.*'safetensors', 'onnx', 'torch.export'"):
        hf.export(tmp_path / "no-such-run", tmp_path / "out", format="tflite")  # refused before reading anything
    with pytest.raises(ValueError, match=r"task\(s\) \['door-open-v3'\] are not among the run's tasks"):
        hf.export(run, tmp_path / "out", format="onnx", tasks=["reach-v3", "door-open-v3"])
    with pytest.raises(ValueError, match=r"task\(s\) \['no-such-task'\] are not among the run's tasks"):
        hf.export(run, tmp_path / "out", format="torch.export", tasks="no-such-task")
    with pytest.raises(ValueError, match="tasks= is for 'onnx' and 'torch.export'"):
        hf.export(run, tmp_path / "out", tasks="reach-v3")
    assert not (tmp_path / "out").exists()
    # the folder is replaced as a whole: a folder holding anything else (here the run itself) is refused
    run_folder = os.path.dirname(run.checkpoint)
    before = sorted(os.listdir(run_folder))
    with pytest.raises(ValueError, match=r"not empty and not a policy export"):
        hf.export(run, run_folder, format="onnx")
    assert sorted(os.listdir(run_folder)) == before
    # an earlier policy export is replaced as a whole; one holding a file of someone else's is refused
    folder = tmp_path / "pt2"
    hf.export(run, folder, format="torch.export", tasks="reach-v3")
    hf.export(run, folder, format="torch.export", tasks="button-press-v3")
    assert sorted(os.listdir(folder)) == ["button-press-v3.pt2", "manifest.json"]
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files its manifest.json does not name \(\['notes.txt'\]\)"):
        hf.export(run, folder, format="torch.export", tasks="reach-v3")
    assert sorted(os.listdir(folder)) == ["button-press-v3.pt2", "manifest.json", "notes.txt"]
    assert cli_main(["export", str(run.checkpoint), str(tmp_path / "out"), "--format", "onnx", "--tasks",
                     "door-open-v3"]) == 2
    assert "harmodt-fast export: error:" in capsys.readouterr().err and not (tmp_path / "out").exists()
