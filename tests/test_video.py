"""Videos of evaluation episodes: real Meta-World episodes rendered offscreen (MuJoCo, the GL backend video.py picks),
written as MP4 (in a worker process) and GIF (in this process, through the CLI), read back with imageio: one file per
recorded episode, one frame per step plus the reset's, a scene that moves, and the same report as without video.

Skipped, saying why, only where no offscreen GL backend loads (.ci/run installs OSMesa so that CI always has one)."""
import os

import numpy as np
import pytest

import harmodt_fast as hf
from harmodt_fast.video import gl_backend
from test_evaluation import TASKS, make_checkpoint

try:
    GL = gl_backend()
except RuntimeError as exc:  # no libOSMesa / libEGL here: nothing can render
    GL, NO_GL = None, str(exc)
pytestmark = pytest.mark.skipif(GL is None, reason=f"no offscreen GL backend: {NO_GL if GL is None else ''}")
STEPS = 12


def read_frames(path):
    import imageio.v2 as imageio

    with imageio.get_reader(path) as reader:
        return np.stack(list(reader.iter_data()))


def check_video(path, task, length):
    """Frames: the reset's and one per step, 240 x 240 RGB, the text box at the top left, the arm moving."""
    frames = read_frames(path)
    assert frames.shape == (length + 1, 240, 240, 3), (task, frames.shape)
    assert frames[:, :8, :8].mean() < 40  # the dark text box
    scene = frames[:, 60:].astype(np.float64)  # below the text (which changes every frame anyway)
    assert scene[0].std() > 20  # a rendered table and arm, not a blank frame
    moved = np.abs(scene[1:] - scene[:-1]).mean(axis=(1, 2, 3))
    assert (moved > 0).mean() > 0.5 and np.abs(scene[-1] - scene[0]).mean() > 0.5, (task, moved)


def test_mp4_per_episode_and_the_same_report_as_without_video(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoint.pt", TASKS)
    kw = dict(episodes=2, max_episode_steps=STEPS, workers=1, precision="fp32")
    plain = hf.evaluate(ckpt, **kw)
    recorded = hf.evaluate(ckpt, video=1, **kw)
    assert "videos" not in plain
    assert recorded["per_task"] == plain["per_task"]  # the same seeds, actions, returns and successes, exactly
    folder = tmp_path / "run" / "plots" / "videos"
    assert sorted(os.listdir(folder)) == sorted(f"{t}_episode0.mp4" for t in TASKS)  # episode 1 not recorded
    for task in TASKS:
        assert recorded["videos"][task] == [str(folder / f"{task}_episode0.mp4")]
        check_video(recorded["videos"][task][0], task, plain["per_task"][task]["lengths"][0])


def test_cli_writes_gif_into_the_plots_folder(tmp_path, capsys):
    from harmodt_fast.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoint.pt", TASKS[:1], seed=2)
    assert main(["evaluate", str(run), "--episodes", "1", "--max-steps", str(STEPS), "--workers", "0",
                 "--video", "1", "--video-format", "gif", "--no-plots", "--no-progress"]) == 0
    path = run / "plots" / "videos" / f"{TASKS[0]}_episode0.gif"
    assert f"video {TASKS[0]}: {path}" in capsys.readouterr().out
    check_video(str(path), TASKS[0], STEPS)


def test_bad_video_arguments_are_refused_before_any_work(tmp_path):
    missing = tmp_path / "nothing-here"  # never read: the arguments are refused first
    with pytest.raises(ValueError, match=r"video must be an integer in 0\.\.2"):
        hf.evaluate(missing, episodes=2, video=3)
    with pytest.raises(ValueError, match="video_format must be one of"):
        hf.evaluate(missing, episodes=2, video=1, video_format="avi")
    with pytest.raises(ValueError, match="no folder to write the videos"):
        hf.evaluate({"not": "loaded"}, episodes=2, video=1)
