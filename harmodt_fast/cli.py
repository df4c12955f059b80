"""harmodt-fast command line (also `python -m harmodt_fast`)."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_info(args) -> int:
    import torch

    from harmodt_fast import ops
    from harmodt_fast._ext import extension_error, extension_origin
    from harmodt_fast.config import HarmoDTConfig
    from harmodt_fast.model import HarmoDT

    overrides = {"num_tasks": args.tasks} if args.tasks else {}
    cfg = HarmoDTConfig.from_preset(args.preset, **overrides)
    with torch.device("meta"):
        model = HarmoDT(cfg.__class__(**{**cfg.to_dict(), "method": "prompt-dt"}))
    from harmodt_fast.masks import masked_weight_shapes
    from harmodt_fast.ops.packing import words_for

    shapes = masked_weight_shapes(model)
    masked = sum(a * b for a, b in shapes.values())
    mask_bytes = sum(words_for(a * b) * 4 for a, b in shapes.values()) * cfg.num_tasks
    info = {
        "preset": args.preset,
        "num_tasks": cfg.num_tasks,
        "parameters": model.num_parameters(),
        "masked_weights": masked,
        "mask_bytes_packed": mask_bytes,
        "mask_bytes_float32_published": masked * 4 * cfg.num_tasks,
        "tokens_per_sequence": cfg.tokens_per_sequence,
        "backends": ops.available_backends(),
        "cpp_extension": extension_origin() or extension_error(),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:32s} {value}")
    return 0


def _cmd_collect(args) -> int:
    from harmodt_fast.data import collect

    written = collect(args.tasks, args.out, args.episodes, quality=args.quality, seed=args.seed,
                      workers=args.workers, episode_steps=args.episode_steps, progress=not args.no_progress,
                      format=args.format, minari_id=args.minari_id)
    if args.format == "minari":
        for task, dataset_id in written.items():
            print(f"{task}: {dataset_id}")
    return 0


def _cmd_export(args) -> int:
    from harmodt_fast.export_policy import export

    folder = export(args.run, args.folder, format=args.format, tasks=args.tasks)
    # a policy export's folder holds only its files; a safetensors export may share its folder
    files = "config.json, model.safetensors, tasks.safetensors" if args.format == "safetensors" else ", ".join(
        sorted(os.listdir(folder)))
    print(f"exported {args.run} to {folder}: {files}")
    return 0


def _cmd_evaluate(args) -> int:
    import os

    from harmodt_fast.evaluation import evaluate, format_table, save_report
    from harmodt_fast.run_folder import folder_of

    run_dir = folder_of(args.checkpoint)
    plots_dir = args.plots or os.path.join(run_dir, "plots")
    # a bad checkpoint (CheckpointError), device or backend is a ValueError: main prints it as one line
    report = evaluate(args.checkpoint, tasks=args.tasks, episodes=args.episodes, seed=args.seed,
                      target_return=args.target_return, max_episode_steps=args.max_steps,
                      unseen=args.unseen, merge_threshold=args.merge_threshold, device=args.device,
                      precision=args.precision, workers=args.workers, max_envs=args.max_envs,
                      progress=not args.no_progress, video=args.video, video_format=args.video_format,
                      video_dir=os.path.join(plots_dir, "videos"))
    print(format_table(report))
    out = args.out or os.path.join(run_dir, f"evaluation_step{report['step']}.json")
    print(f"report: {save_report(report, out)}")
    if not args.no_plots:
        try:
            from harmodt_fast.plots import plot_all

            figures = plot_all(report, args.checkpoint, plots_dir)
        except ImportError as exc:
            print(f"plots skipped: {exc}", file=sys.stderr)
        else:
            for name, where in figures.items():
                print(f"{name:14s} {where}")
    for task, files in report.get("videos", {}).items():
        print(f"video {task}: {', '.join(files)}")
    return 0


def _parse_overrides(pairs) -> dict:
    """--set name=value pairs -> config overrides, each value parsed by the field's declared type."""
    from harmodt_fast.config import HarmoDTConfig

    overrides = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects name=value, got {pair!r}")
        overrides[name] = HarmoDTConfig.parse_value(name, value)
    return overrides


def _cmd_train(args) -> int:
    overrides = _parse_overrides(args.set)
    if args.print_config:  # the preset, the file and the overrides resolved; the dataset is not read
        from harmodt_fast.config import HarmoDTConfig

        steps = {"steps": args.steps} if args.steps is not None else {}
        config = HarmoDTConfig.resolve(args.preset, args.config, {**overrides, **steps})[0]
        print(config.to_yaml("without the dataset: training sets state_dim, act_dim and (when null) tasks from it"),
              end="")
        return 0
    if args.data is None or args.out is None:
        raise ValueError("the following arguments are required: data, --out (--print-config alone runs without)")
    from harmodt_fast.trainer import train

    result = train(args.data, args.out, preset=args.preset, steps=args.steps, device=args.device,
                   config=args.config, stop_at=args.stop_at, progress=not args.no_progress,
                   check_memory=not args.no_memory_check, **overrides)
    if os.environ.get("RANK", "0") != "0":  # data-parallel: rank 0 reports for all
        return 0
    last = result.history[-1] if result.history else {}
    print(f"step {result.step}  loss {last.get('loss', float('nan')):.4f}  checkpoint {result.checkpoint}")
    if result.masks is not None:
        print(f"masks: {result.masks}")
    return 0


def _cmd_plan(args) -> int:
    from harmodt_fast.memory_plan import plan

    result = plan(args.preset, args.tasks, batch_per_task=args.batch_per_task, device_memory=args.device_memory,
                  device=args.device, transitions=args.transitions, **_parse_overrides(args.set))
    print(json.dumps(result.to_dict(), indent=1) if args.json else result)
    return 0


def _cmd_bench(args) -> int:
    # the side-by-side's options default to None so that run_bench's signature holds the one set of defaults
    given = {k: v for k, v in dict(preset=args.preset, num_tasks=args.tasks, seconds=args.seconds,
                                   device=args.device, out=args.out).items() if v is not None}
    if args.name:
        if given:
            raise ValueError("--preset, --tasks, --seconds, --device and --out are the side-by-side's (no NAME); "
                             f"give {args.name}'s own options after its name")
        from harmodt_fast.bench import run

        return run(args.name, args.args)
    from harmodt_fast.bench import side_by_side

    side_by_side(**given)
    return 0


def _cmd_demo(args) -> int:
    from harmodt_fast.demo import run_demo

    run_demo(root=args.root, episodes_per_task=args.episodes, steps=args.steps, eval_episodes=args.eval_episodes,
             eval_every=args.eval_every, seed=args.seed, workers=args.workers, device=args.device, tasks=args.tasks)
    return 0


def _cmd_reproduce(args) -> int:
    from harmodt_fast.reproduction import reproduce

    report = reproduce(args.suite, args.out, qualities=args.qualities.split(","), arms=args.arms.split(","),
                       seeds=[int(s) for s in args.seeds.split(",")], steps=args.steps, preset=args.preset,
                       episodes_per_task=args.episodes, eval_episodes=args.eval_episodes, eval_every=args.eval_every,
                       eval_max_steps=args.eval_max_steps, episode_steps=args.episode_steps,
                       flip_fraction=args.flip_fraction, expert_episodes=args.expert_episodes,
                       data_root=args.data_root, data_seed=args.data_seed, device=args.device, workers=args.workers,
                       progress=not args.no_progress, bootstrap_reps=args.bootstrap_reps, **_parse_overrides(args.set))
    for quality, per_arm in report["summary"].items():
        for arm, s in per_arm.items():
            iqm = report["statistics"][quality]["arms"][arm]["success"]["iqm"]
            print(f"{quality:13s} {arm:18s} final IQM {100 * iqm['point']:5.1f} [{100 * iqm['low']:5.1f}, "
                  f"{100 * iqm['high']:5.1f}]   mean {100 * s['final_mean']:5.1f} ± {100 * s['final_std']:4.1f}   "
                  f"({len(s['seeds'])} seeds)")
    print(f"report: {args.out}/report.md")
    return 0


class _TrainHelp(argparse.Action):
    """train's --help: its options, then every config field with its type, default and meaning, generated from
    HarmoDTConfig when asked for (building the parser imports no torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from harmodt_fast.config import DEFAULT_PRESET, PRESETS, HarmoDTConfig

        parser.epilog = (f"config fields (--set NAME=VALUE, or NAME: VALUE in a --config file), with the "
                         f"dataclass's defaults;\nthe preset ({DEFAULT_PRESET} unless --preset or the file names "
                         f"one of {', '.join(PRESETS)}) replaces some of them:\n{HarmoDTConfig.field_help()}")
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmodt-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="model size, mask memory and the backends available here")
    p.add_argument("--preset", default="paper")
    p.add_argument("--tasks", type=int, default=50, help="number of tasks (default 50 = MT50)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("collect", help="collect an offline dataset from Meta-World's scripted experts")
    p.add_argument("--tasks", default="MT5", help="task set (MT5, MT10, MT30, MT50) or comma-separated v3 names")
    p.add_argument("--out", required=True, help="dataset folder (an unfinished collection there is resumed)")
    p.add_argument("--episodes", type=int, default=100, help="episodes per task (the paper's buffers: 2000)")
    p.add_argument("--quality", default="near-optimal", choices=["near-optimal", "sub-optimal", "expert"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the CPUs available)")
    p.add_argument("--episode-steps", type=int, default=500, help="steps per episode (at most 500)")
    p.add_argument("--format", default="harmodt_fast", choices=["harmodt_fast", "minari"],
                   help="minari: also write one Minari dataset per task (pip install 'harmodt_fast[minari]')")
    p.add_argument("--minari-id", default="harmodt_fast/{task}-v0", help="Minari dataset id template")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("evaluate", help="roll a trained model out in Meta-World: per-task success, JSON report, plots")
    p.add_argument("checkpoint", help="a checkpoint file, a run folder holding checkpoint.pt or an export folder")
    p.add_argument("--tasks", default=None, help="default: the checkpoint's tasks; a task set or comma-separated names")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task, goal variants 0..episodes-1")
    p.add_argument("--seed", type=int, default=0, help="Meta-World MT1 seed of the goal-variant list")
    p.add_argument("--target-return", type=float, default=None, help="return-to-go target (default: the config's)")
    p.add_argument("--max-steps", type=int, default=500, help="steps per episode (at most 500)")
    p.add_argument("--unseen", action="store_true", help="evaluate tasks outside the checkpoint with the consensus mask")
    p.add_argument("--merge-threshold", type=int, default=None, help="consensus: keep a weight kept by >= this many tasks")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"], help="default: the config's")
    p.add_argument("--workers", type=int, default=None, help="environment worker processes (0: in this process)")
    p.add_argument("--max-envs", type=int, default=None, help="at most this many environments open at once (~20 MB each)")
    p.add_argument("--out", default=None, help="JSON report path (default: RUN/evaluation_step<step>.json)")
    p.add_argument("--plots", default=None, help="folder for the figures (default: RUN/plots)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--video", type=int, default=0, metavar="N",
                   help="record the first N episodes of every task into PLOTS/videos (one file per episode)")
    p.add_argument("--video-format", default="mp4", choices=["mp4", "gif"], help="video file format")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="write a run as config.json + safetensors files (loadable without pickle), or "
                                      "one ONNX / torch.export file per task")
    p.add_argument("run", help="a run folder or a checkpoint file")
    p.add_argument("folder", help="the export folder")
    p.add_argument("--format", default="safetensors",
                   help="safetensors (default: the whole model), onnx or torch.export (one dense policy per task "
                        "and manifest.json; pip install 'harmodt_fast[export]')")
    p.add_argument("--tasks", default=None, help="onnx / torch.export: the tasks to export (default: all the run's)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("train", help="train HarmoDT (or a baseline) on an offline dataset; resumes a run folder",
                       add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The config: the preset, then the --config file, then --steps and --set (each "
                       "over the one before).\nThe run folder keeps it whole as RUN/config.yaml "
                       "(--config RUN/config.yaml reruns it).")
    p.add_argument("-h", "--help", action=_TrainHelp, help="show this help, with every config field, and exit")
    p.add_argument("data", nargs="?", help="dataset folder (harmodt-fast collect output, the MTDiff layout or a "
                                           "Minari dataset folder) or minari:<dataset_id>")
    p.add_argument("--out", help="run folder: checkpoint.pt, metrics.jsonl, config.yaml (resumed if present)")
    p.add_argument("--config", metavar="FILE", help="a YAML or JSON file of config fields (name: value), and "
                                                    "optionally preset: NAME")
    p.add_argument("--print-config", action="store_true",
                   help="print the config (preset, --config, --steps, --set) as YAML and exit; needs no data")
    p.add_argument("--preset", default=None, help="tiny, demo, paper or large (default: the --config file's "
                                                  "preset, else demo)")
    p.add_argument("--steps", type=int, default=None, help="total steps (default: the preset's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--stop-at", type=int, default=None, help="stop with a checkpoint after this many steps")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="config override, e.g. --set method=prompt-dt --set lr=3e-4 --set tasks=MT5 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the memory plan (harmodt-fast plan) says it does not fit the device")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("plan", help="the memory a run needs at its peak, by part, and the largest batch that fits")
    p.add_argument("--preset", default="paper", help="tiny, demo, paper or large")
    p.add_argument("--tasks", default="50", help="number of tasks, a task set (MT50) or comma-separated names")
    p.add_argument("--batch-per-task", type=int, default=None, help="default: the preset's")
    p.add_argument("--device-memory", default=None, help="e.g. 139GiB, 24GB, 512MiB (default: this device's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (a GPU run can be planned without one)")
    p.add_argument("--transitions", type=int, default=None, help="the dataset's transitions, to count its copy")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="config override (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("reproduce", help="the mechanism-ablation suite: data, every (quality, arm, seed), report "
                       "with intervals")
    p.add_argument("--suite", default="MT5", help="task set (MT5, MT10, MT30, MT50) or comma-separated v3 names")
    p.add_argument("--out", default="reports/mt5", help="suite folder (runs, report.md, report.json, plots); resumed")
    p.add_argument("--qualities", default="near-optimal,sub-optimal")
    p.add_argument("--arms", default="harmodt,random-masks,prompt-dt,mtdt,harmodt-flip",
                   help="comma-separated arms: harmodt (harmony mask updates), random-masks (the same per-task "
                   "masks, never updated), prompt-dt, mtdt, harmodt-flip (harmodt flipping --flip-fraction per update)")
    p.add_argument("--flip-fraction", type=float, default=0.05,
                   help="harmodt-flip's flips per mask update, a share of each task's active weights; the arm is "
                   "named after it (harmodt-flip0.05)")
    p.add_argument("--expert-episodes", type=int, default=5,
                   help="held-out expert episodes per task (data seed + 1) for every run's action MSE; 0: none")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run")
    p.add_argument("--preset", default="demo")
    p.add_argument("--episodes", type=int, default=100,
                   help="near-optimal episodes per task (sub-optimal: the first half of them)")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=250, help="steps between evaluations (and the last step)")
    p.add_argument("--eval-max-steps", type=int, default=500, help="steps per evaluation episode (at most 500)")
    p.add_argument("--episode-steps", type=int, default=500, help="steps per collected episode (at most 500)")
    p.add_argument("--bootstrap-reps", type=int, default=10000, help="bootstrap samples per confidence interval")
    p.add_argument("--data-root", default=None, help="dataset folders (default: OUT/data)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="collection and evaluation worker processes")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="config override for every run (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_reproduce)

    from harmodt_fast.bench import BENCHMARKS, TOOLS, listing

    p = sub.add_parser("bench", help="benchmarks; without NAME: masked matmuls vs dense, training steps, mask update",
                       description="Without NAME: the quick side-by-side here (masked matmuls vs dense and "
                       "materialising, training steps, one mask update). With NAME: that benchmark, with its own "
                       "ARGS (`harmodt-fast bench NAME --help`); the same as `python -m "
                       "harmodt_fast.benchmarks.NAME ARGS`.", epilog=listing(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=[*BENCHMARKS, *TOOLS], metavar="NAME", help="a benchmark (below)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the benchmark's own options")
    p.add_argument("--preset", default=None, help="side-by-side: the preset")
    p.add_argument("--tasks", type=int, default=None, help="side-by-side: the task count")
    p.add_argument("--seconds", type=float, default=None, help="side-by-side: time budget per measurement")
    p.add_argument("--device", default=None, help="side-by-side: auto, cpu or cuda")
    p.add_argument("--out", default=None, help="side-by-side: write the results as JSON here")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="collect a small MT5 dataset, train the demo preset, evaluate, plot")
    p.add_argument("--root", default="harmodt_demo", help="folder for the data and the run (reused when present)")
    p.add_argument("--tasks", default="MT5")
    p.add_argument("--episodes", type=int, default=40, help="episodes per task to collect")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo preset's)")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations during training (default: half the steps; the last always)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    """Runs one command; returns the exit status: 2 for bad input, 1 for a run that cannot go on (its folder in
    use, a file it cannot write, divergence), 128 + the signal's number for a run stopped by SIGTERM (after its
    checkpoint), one line on stderr each. SIGINT (Ctrl-C) ends with its KeyboardInterrupt as any Python program."""
    import signal

    from harmodt_fast.run_folder import TrainingError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: one clear line, no traceback
        print(f"harmodt-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        number = getattr(exc, "signal", signal.SIGINT)  # a trainer's TrainingStopped: the signal that stopped it
        if number == signal.SIGINT:
            raise
        print(f"harmodt-fast {args.command}: {exc}", file=sys.stderr)
        return 128 + (number or signal.SIGTERM)  # None: another data-parallel rank's signal (torchrun: SIGTERM)
    except TrainingError as exc:
        print(f"harmodt-fast {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
