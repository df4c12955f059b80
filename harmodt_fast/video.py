"""Videos of evaluation episodes: the offscreen OpenGL backend MuJoCo renders with, the text written on every frame
(task, episode, step, return, success), and the files, one per episode (MP4 through imageio-ffmpeg, or GIF through
Pillow).

The GL backend: MuJoCo reads MUJOCO_GL when it makes a rendering context (PyOpenGL reads PYOPENGL_PLATFORM when it
is first imported). A value the user set is kept; otherwise `gl_backend()` picks "egl" on a machine with an NVIDIA
GPU and "osmesa" (software, any CPU) elsewhere, each only if its library loads, and `use_gl_backend` sets both
variables in the process that renders (an evaluation worker) before its first environment is made.
Torch-free: the evaluation's environment workers import it.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import glob
import importlib.util
import os
import secrets

from harmodt_fast._io import TEMPORARY_PREFIX, atomic_write
from harmodt_fast.run_folder import folder_of

VIDEO_FORMATS = ("mp4", "gif")
VIDEO_FPS = 30
VIDEO_SIZE = 240  # pixels per side: small enough to render and encode in a few ms a frame
_GL_LIBRARIES = {"egl": "EGL", "osmesa": "OSMesa"}  # backend -> the shared library it needs (ctypes name)


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """What to record: the first `episodes` episodes of every task (goal variants 0..episodes-1), written to
    `folder` as `<task>_episode<e>.<fmt>`, rendered with MuJoCo's GL backend `gl`."""
    episodes: int
    folder: str
    fmt: str = "mp4"
    gl: str = "osmesa"
    size: int = VIDEO_SIZE

    def path(self, task: str, episode: int) -> str:
        return os.path.join(self.folder, f"{task}_episode{episode}.{self.fmt}")


def video_spec(episodes: int, folder, fmt: str = "mp4") -> VideoSpec:
    """A checked VideoSpec: the format is known, its writer and Pillow import, a GL backend loads (ValueError,
    ImportError or RuntimeError saying what to install, before any work)."""
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"video_format must be one of {VIDEO_FORMATS}, got {fmt!r}")
    if folder is None:
        raise ValueError("video: no folder to write the videos to: pass video_dir (a run folder or checkpoint path "
                         "gives RUN/plots/videos by default)")
    missing = [m for m in (("PIL", "imageio_ffmpeg") if fmt == "mp4" else ("PIL",))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"videos ({fmt}) need {' and '.join(missing)}: pip install 'harmodt_fast[video]'")
    return VideoSpec(int(episodes), os.path.abspath(os.fspath(folder)), fmt, gl_backend())


def default_video_folder(source) -> str | None:
    """RUN/plots/videos for a run folder, a checkpoint file in RUN or an object with a `.checkpoint` path (what
    hf.train returns); None for a loaded checkpoint (no folder to name)."""
    path = getattr(source, "checkpoint", source)
    if not isinstance(path, (str, os.PathLike)):
        return None
    return os.path.join(folder_of(path), "plots", "videos")


# ---- the GL backend ------------------------------------------------------------------------------------------------
def gl_backend() -> str:
    """The offscreen GL backend for MuJoCo: MUJOCO_GL if the user set it; else "egl" on a machine with an NVIDIA GPU
    and "osmesa" elsewhere, falling back to the other when its library does not load. RuntimeError naming what to
    install when neither loads."""
    chosen = os.environ.get("MUJOCO_GL")
    if chosen:
        return chosen
    nvidia = bool(glob.glob("/dev/nvidia[0-9]*"))
    reasons = []
    for name in ("egl", "osmesa") if nvidia else ("osmesa", "egl"):
        reason = _unloadable(name)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise RuntimeError("videos need an offscreen OpenGL backend for MuJoCo and none loads here ("
                       + "; ".join(reasons) + "). On Debian/Ubuntu: apt-get install libosmesa6 (software "
                       "rendering); pip install PyOpenGL; or set MUJOCO_GL to a backend that works here")


def _unloadable(name: str) -> str | None:
    """Why backend `name` cannot be used here (PyOpenGL or its library missing), or None."""
    if importlib.util.find_spec("OpenGL") is None:
        return "PyOpenGL is not installed"
    library = ctypes.util.find_library(_GL_LIBRARIES[name])
    if library is None:
        return f"no lib{_GL_LIBRARIES[name]} found"
    try:
        ctypes.CDLL(library)
    except OSError as exc:
        return f"{library} does not load ({exc})"
    return None


def use_gl_backend(name: str) -> None:
    """Sets MUJOCO_GL (and PyOpenGL's platform, for egl and osmesa) in this process unless the user set them; call
    it before this process makes its first rendering environment."""
    os.environ.setdefault("MUJOCO_GL", name)
    if name in _GL_LIBRARIES:
        os.environ.setdefault("PYOPENGL_PLATFORM", name)


# ---- frames and files ----------------------------------------------------------------------------------------------
def annotate(frame, lines: list[str], highlight: bool = False):
    """The frame [H, W, 3] uint8 with `lines` written on a dark box at its top left (green text if `highlight`)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(9, frame.shape[0] // 22))
    text = "\n".join(lines)
    left, top, right, bottom = draw.multiline_textbbox((4, 3), text, font=font, spacing=2)
    draw.rectangle((0, 0, right + 4, bottom + 4), fill=(0, 0, 0))
    draw.multiline_text((4, 3), text, font=font, spacing=2, fill=(90, 230, 90) if highlight else (255, 255, 255))
    return np.asarray(image)


class EpisodeRecorder:
    """One episode's video: record(env) after the reset and after every step renders the frame, writes the task,
    episode, step, return and success so far on it and adds it (so an episode of n steps has n + 1 frames).
    MP4: frames stream into an ffmpeg process (imageio-ffmpeg's binary), so no episode is held in memory; GIF: frames
    are kept and written at the end (Pillow). The file appears, whole, on finish()."""

    def __init__(self, spec: VideoSpec, task: str, episode: int, max_steps: int):
        self.spec, self.task, self.episode, self.max_steps = spec, task, int(episode), int(max_steps)
        self.path = spec.path(task, episode)
        self.steps, self.episode_return, self.success = 0, 0.0, False
        os.makedirs(spec.folder, exist_ok=True)
        self._frames, self._writer, self._tmp = [], None, None
        if spec.fmt == "mp4":
            import imageio_ffmpeg

            self._tmp = os.path.join(spec.folder, f"{TEMPORARY_PREFIX}{secrets.token_hex(6)}.mp4")
            # one encoder thread: many episodes record at once, in every worker
            self._writer = imageio_ffmpeg.write_frames(self._tmp, (spec.size, spec.size), fps=VIDEO_FPS,
                                                       codec="libx264", macro_block_size=1, ffmpeg_log_level="error",
                                                       output_params=["-threads", "1"])
            self._writer.send(None)  # starts ffmpeg

    def record(self, env, reward: float | None = None, success: bool = False) -> None:
        """Adds env's current frame; reward None: the frame after the reset, else after a step with this reward."""
        from harmodt_fast.envs import render_frame

        if reward is not None:
            self.steps, self.episode_return = self.steps + 1, self.episode_return + float(reward)
            self.success |= bool(success)
        lines = [f"{self.task}  episode {self.episode}", f"step {self.steps}/{self.max_steps}  return "
                 f"{self.episode_return:.1f}", f"success {'yes' if self.success else 'no'}"]
        frame = annotate(render_frame(env), lines, highlight=self.success)
        if self._writer is not None:
            self._writer.send(frame)
        else:
            self._frames.append(frame)

    def finish(self) -> str:
        """Writes the file (atomically: a temporary file renamed into place); returns its path."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            os.replace(self._tmp, self.path)
            return self.path
        from PIL import Image

        images = [Image.fromarray(f) for f in self._frames]
        self._frames = []
        return atomic_write(self.path, lambda f: images[0].save(
            f, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / VIDEO_FPS), loop=0))

    def abort(self) -> None:
        """Drops an unfinished episode (the evaluation stopped): no file, no ffmpeg left running."""
        self._frames = []
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
