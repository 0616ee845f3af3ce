"""xct entry point: ``python -m xct.main --config=unet64 --workdir=DIR``.

``--config`` takes a config file (``path/to/my_config.py[:arg]``) or the name of one of
xct's own (``configs/NAME.py``: ``quickstart``, ``unet64``, ... as ``NAME[:arg]``).

    --mode=train      train (resumes from DIR's last checkpoint), then validate
    --mode=evaluate   score the best checkpoint on config.eval.split -> DIR/metrics.json and
                      DIR/eval/ (per_volume.csv, volumes/*.nii.gz, report.html)
                      --eval_ct_dir=CTS: score a folder of real CT volumes instead
                      --checkpoint=best,last (or other workdirs): mean of several models
    --mode=predict    --xrays=a.png,b.png --angles_deg=0,90 --output=ct.nii.gz

Any config field can be overridden: ``--config.data.num_views=4``. Errors in the config or
the inputs are printed as one line with a non-zero exit status. The terminal shows
progress and results only (``xct.console.quiet``); ``--verbosity=0`` or ``XCT_VERBOSE=1``
brings back the libraries' logs. Compiled programs are cached on disk
(``--compilation_cache_dir``, default ``~/.cache/xct/jax``; ``--nocompilation_cache`` to
turn it off), so a repeated or resumed run starts stepping in seconds.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from xct import console

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "config file FILE.py[:arg], or NAME[:arg] of configs/NAME.py",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "where checkpoints, logs and metrics go")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"], "what to do")
flags.DEFINE_string(
    "checkpoint",
    "best",
    "evaluate/predict: 'best', 'last', a step, or a comma list (also DIR[:best|last|STEP] "
    "of other workdirs) whose predictions are averaged",
)
flags.DEFINE_string("eval_ct_dir", None, "evaluate: folder of CT volumes to render and score")
flags.DEFINE_list(
    "eval_series_uids",
    [],
    "evaluate: NAME=UID,... the SeriesInstanceUID to read from a DICOM folder of --eval_ct_dir "
    "holding several CT series (NAME: its path relative to --eval_ct_dir)",
)
flags.DEFINE_string("eval_dir", None, "evaluate: output folder (default WORKDIR/eval[_CTDIR])")
flags.DEFINE_list("xrays", [], "predict: X-ray files (.npy line integrals, .png, .dcm)")
flags.DEFINE_list(
    "angles_deg",
    [],
    "predict: gantry angle of each X-ray, degrees (DICOM radiographs: from ViewPosition, "
    "PA 0, AP 180, LL -90, RL 90, unless given)",
)
flags.DEFINE_string(
    "template",
    None,
    "predict: a template CT file for calibrating radiographs (default: the model's own prediction)",
)
flags.DEFINE_bool(
    "calibrate",
    True,
    "predict: calibrate DICOM radiographs (pose, scale, value map; xct.calibrate) first",
)
flags.DEFINE_string("output", "prediction.nii.gz", "predict: output NIfTI path")
flags.DEFINE_bool("compilation_cache", True, "keep compiled programs on disk between runs")
flags.DEFINE_string(
    "compilation_cache_dir", None, "where compiled programs are kept (default ~/.cache/xct/jax)"
)


def main(argv) -> int:
    if not FLAGS.is_parsed() or FLAGS["verbosity"].present == 0:
        console.quiet()  # before JAX is imported: XLA reads its log level once
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    if FLAGS.config is None or not FLAGS.workdir:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 2
    problem = _dir_problem(FLAGS.config, FLAGS.workdir, FLAGS.mode, bool(FLAGS.eval_ct_dir))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from xct import evaluate, sharding
    from xct.experiment import Experiment

    console.enable_compilation_cache(FLAGS.compilation_cache_dir, enabled=FLAGS.compilation_cache)
    config = FLAGS.config
    # Before any device is touched: every host then sees the global devices.
    sharding.maybe_initialize_distributed(config.get("distributed", None) or None)
    try:
        if FLAGS.mode == "train":
            result = _train(config, FLAGS.workdir)
            if result:
                print(_summary(result))
        elif FLAGS.mode == "evaluate":
            result = evaluate.evaluate(
                Experiment.from_config(config),
                FLAGS.workdir,
                FLAGS.checkpoint,
                ct_dir=FLAGS.eval_ct_dir,
                out_dir=FLAGS.eval_dir,
                series_uids=_series_uids(FLAGS.eval_series_uids),
            )
            print(_summary(result))
        else:
            from xct import predict

            angles = [float(a) for a in FLAGS.angles_deg]
            path = predict.predict(
                Experiment.from_config(config),
                FLAGS.workdir,
                FLAGS.xrays,
                angles,
                FLAGS.output,
                FLAGS.checkpoint,
                template=FLAGS.template,
                calibrate=FLAGS.calibrate,
            )
            print(f"wrote {path}")
    # OSError: a full disk (checkpoint.DiskFull), a file that cannot be read or written.
    except (ValueError, KeyError, OSError, FloatingPointError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


def _dir_problem(config, workdir: str, mode: str, ct_dir: bool) -> str | None:
    """Why ``workdir`` or ``config.data.data_dir`` cannot serve ``mode`` (one line), or
    ``None``: training needs a workdir it can create and write; evaluation and prediction
    one that exists; a stored dataset's data_dir must exist unless the synthetic dataset
    it names is built there on first use (then it must be creatable)."""
    import pathlib
    import tempfile

    wd = pathlib.Path(workdir).expanduser()
    if mode == "train":
        try:
            wd.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=wd).close()  # a read-only filesystem, even for root
        except OSError as e:
            return f"--workdir: cannot write in {wd} ({e.strerror or e})"
    elif not wd.is_dir():
        return f"--workdir: {wd} does not exist"
    if mode == "predict" or ct_dir or config.data.get("source", "tfds") != "tfds":
        return None
    # config.data.tfds (the source's section) or, in a config of the flat layout, config.data
    section = "data.tfds" if "tfds" in config.data else "data"
    tfds = config.data.get("tfds", None) or config.data
    dataset = str(tfds.get("dataset", ""))
    data_dir = pathlib.Path(str(tfds.get("data_dir", ""))).expanduser()
    if data_dir.is_dir():
        return None
    if not dataset.startswith("synthetic_chest/") or mode != "train":
        return (
            f"--config.{section}.data_dir: {data_dir} does not exist (build {dataset} there "
            f"with python -m data_pipelines.build --dataset={dataset} --data_dir={data_dir})"
        )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"--config.{section}.data_dir: cannot create {data_dir} ({e.strerror or e})"
    return None


def _series_uids(items: list[str]) -> dict[str, str]:
    """``NAME=UID`` items as a dict; ``ValueError`` (one line, exit 1) on a malformed one."""
    out = {}
    for item in items:
        name, _, uid = item.rpartition("=")
        if not name or not uid:
            raise ValueError(f"--eval_series_uids: expected NAME=UID, got {item!r}")
        out[name] = uid
    return out


def _train(config, workdir) -> dict:
    """Train (progressively when ``config.train.stages`` is set), then evaluate the best
    checkpoint on the test split when the data source has one. A run stopped by SIGTERM
    or its time budget has saved its state and leaves without evaluating."""
    from xct import evaluate, train
    from xct.experiment import Experiment

    if config.train.get("stages", ""):
        last = train.train_progressive(config, workdir)
        exp, workdir, result = last.experiment, last.workdir, last.result
    else:
        exp = Experiment.from_config(config)
        result = train.train_and_evaluate(exp, workdir)
    if result.get("stopped"):
        return {}
    if not exp.data.has_validation:
        return {}
    return evaluate.evaluate(exp, workdir)


def _summary(r: dict) -> str:
    data = f"{r['num_volumes']} CTs of {r['ct_dir']}" if r.get("ct_dir") else f"{r['split']} split"
    return (
        f"{data}, {r['num_views']} views, checkpoint step {r['checkpoint_step']}: "
        f"PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}  MAE {r['mae_hu']:.1f} HU  "
        f"DRR PSNR {r['drr_psnr']:.2f} dB  "
        f"(HU clipped to [-1000, 1024] -> [0, 1]; 3D PSNR peak 1; 3D SSIM sigma 1.5 voxels)"
        f"\nreport: {r['eval_dir']}/report.html"
    )


def config_path(spec: str) -> str:
    """``NAME[:arg]`` of a config shipped in ``configs/`` -> its file path (``[:arg]``
    kept); anything else (a path, ``*.py``) unchanged."""
    import pathlib

    import xct.configs

    name, sep, arg = spec.partition(":")
    if not name or "/" in name or "\\" in name or name.endswith(".py"):
        return spec
    # The top-level configs/ folder, installed as the package xct.configs (setup.cfg).
    file = pathlib.Path(xct.configs.__file__).parent / f"{name}.py"
    if not file.is_file() or name in ("__init__", "common"):
        shipped = sorted(
            f.stem for f in file.parent.glob("*.py") if f.stem not in ("__init__", "common")
        )
        _flag_error(f"--config: no config named {name!r}; xct's own are {', '.join(shipped)}")
    return f"{file}{sep}{arg}"


def _config_names(argv: list[str]) -> list[str]:
    """``--config=NAME`` / ``--config NAME`` -> the shipped file's path; an old flat data
    field (``--config.data.pool_size=2``) -> its section (``experiment.legacy_flag``)."""
    from xct import experiment

    # config_flags reads the overrides' names from sys.argv itself.
    sys.argv = [experiment.legacy_flag(a) for a in sys.argv]
    out = [experiment.legacy_flag(a) for a in argv]
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + config_path(a[len("--config=") :])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = config_path(out[i + 1])
    return out


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a bad flag or config (a typo in a field, a config file that does
    not exist or fails to load) as one line and exit status 2 instead of a traceback."""
    try:
        args = FLAGS(_config_names(argv))
        if FLAGS["config"].present:
            FLAGS.config.keys()  # config_flags defers a failed load to the first access
        return args
    except flags.Error as e:
        _flag_error(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
    except (AttributeError, KeyError) as e:  # ml_collections: no such field
        text = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
        _flag_error(f"--config: no such config field {text}")
    except (OSError, ValueError, TypeError) as e:
        text = str(e)
        missing = [ln.strip() for ln in text.splitlines() if "No such file" in ln]
        first = missing[0] if missing else (text.strip().splitlines() or [type(e).__name__])[0]
        _flag_error(f"--config: {first}")
    return []


def _flag_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    print("Try --help.", file=sys.stderr)
    sys.exit(2)


def run(argv: list[str] | None = None) -> None:
    """``app.run(main)``; ``--help`` exits with status 0."""
    argv = list(sys.argv if argv is None else argv)
    console.quiet(argv)
    asked_help = any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:])
    try:
        app.run(main, argv=argv, flags_parser=_parse_flags)
    except SystemExit as e:
        if asked_help and e.code == 1:
            sys.exit(0)
        raise


if __name__ == "__main__":
    run()
