"""Package a trained workdir as a shipped model: ``checkpoints/NAME/`` in the repository.

    python -m scripts.ship_checkpoint --workdir=/tmp/runs/lgd64 --name=unrolled64_v2 \\
        --base=unrolled64 --set data.source=render data.phantom_version=2 \\
        --title="..." --command="python -m xct.main --config=unrolled64 ..."

Writes ``checkpoints/NAME/`` holding

* ``checkpoints/STEP/``: the Orbax checkpoint of the chosen step (``--step``, default the
  last), copied as it is (train state with EMA parameters, optimiser state, data state);
* ``config.json``: the workdir's own record of the config it trained with;
* ``config.py``: a config file ``--config`` accepts: the shipped base config (``--base``)
  with the overrides the run used (``--set KEY=VALUE ...``), and the training command in
  its docstring.

Then loads the copy through ``config.py`` exactly as ``--mode=evaluate`` does and checks
that its config matches ``config.json`` field by field and that it holds at most
``--max_mb`` megabytes (the repository's limit for a shipped model: 20). Score it with

    python -m xct.main --mode=evaluate --config=checkpoints/NAME/config.py \\
        --workdir=checkpoints/NAME --checkpoint=last --eval_ct_dir=DIR
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import shutil
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

_TEMPLATE = '''"""{title}

Trained with (a {seconds} run on {machine}):

    {command}

Score it on a folder of CTs, or reconstruct your own radiographs:

    python -m xct.main --mode=evaluate --config=checkpoints/{name}/config.py \\\\
        --workdir=checkpoints/{name} --checkpoint=last --eval_ct_dir=DIR
    python -m scripts.quality_table --checkpoint_workdir=checkpoints/{name} \\\\
        --config=checkpoints/{name}/config.py --checkpoint=last --ct_dir=DIR --phantoms=0 ...

Written by ``python -m scripts.ship_checkpoint``; BENCHMARKS.md has its scores.
"""

from xct.configs import {base}


def get_config(arg=None):
    c = {base}.get_config({base_call})
{assignments}    return c
'''


def _command_lines(command: str, width: int = 88) -> str:
    """The command as docstring lines: a ``# comment`` in it first, then the command broken
    before `` --`` into shell continuation lines of about ``width`` characters."""
    code, _, comment = command.partition("#")
    lines, line = [], ""
    for part in code.strip().replace(" --", "\0--").split("\0"):
        if line and len(line) + 1 + len(part) > width:
            lines.append(line + " \\\\")
            line = "    " + part
        else:
            line = f"{line} {part}" if line else part
    lines.append(line)
    if comment.strip():
        lines = textwrap.wrap("# " + comment.strip(), width) + lines
    return "\n    ".join(lines)


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def ship(args) -> pathlib.Path:
    src = pathlib.Path(args.workdir).expanduser().resolve()
    steps = sorted(int(p.name) for p in (src / "checkpoints").glob("[0-9]*") if p.is_dir())
    if not steps:
        raise SystemExit(f"--workdir: no checkpoint in {src / 'checkpoints'}")
    step = args.step if args.step is not None else steps[-1]
    if step not in steps:
        raise SystemExit(f"--step: no step {step} in {src / 'checkpoints'} (has {steps})")
    if not (src / "config.json").is_file():
        raise SystemExit(f"--workdir: {src / 'config.json'} is missing")
    dst = pathlib.Path(args.out_dir or ROOT / "checkpoints") / args.name
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / str(step), dst / "checkpoints" / str(step))
    shutil.copy2(src / "config.json", dst / "config.json")
    assignments = ""
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key.replace(".", "").replace("_", "").isalnum():
            raise SystemExit(f"--set: expected KEY=VALUE with a dotted config field, got {item!r}")
        assignments += f"    c.{key} = {_value(text)!r}\n"
    (dst / "config.py").write_text(
        _TEMPLATE.format(
            title="\n".join(textwrap.wrap(args.title, 92)),
            seconds=args.seconds,
            machine=args.machine,
            command=_command_lines(args.command),
            name=args.name,
            base=args.base.partition(":")[0],
            base_call=f"arg or {args.base.partition(':')[2]!r}" if ":" in args.base else "arg",
            assignments=assignments,
        ),
        encoding="utf-8",
    )
    return dst


def verify(dst: pathlib.Path, max_mb: float, ignore=(), single_device: bool = False) -> dict:
    """Load the shipped model as ``--mode=evaluate`` does; returns a summary.
    ``single_device``: build it on one device (``mesh.data = 1``), whatever the machine has."""
    import jax

    from scripts.quality_table import _load_config
    from xct import evaluate, experiment

    config = _load_config(str(dst / "config.py"))
    # Both with the data sections (a run stored before them has flat data fields).
    stored = json.loads((dst / "config.json").read_text())
    stored = _flatten({**stored, "data": experiment.upgrade_data(stored.get("data", {}))})
    mine = _flatten(json.loads(config.to_json()))
    ignore = {experiment.upgrade_path(k) for k in ignore}
    differ = sorted(k for k in stored if k in mine and stored[k] != mine[k] and k not in ignore)
    if differ:
        raise SystemExit(
            f"{dst / 'config.py'} differs from the run's config.json in: "
            + ", ".join(f"{k} ({mine[k]!r} vs {stored[k]!r})" for k in differ)
        )
    if single_device:
        config.mesh.data = 1
    exp = experiment.Experiment.from_config(config)
    state, step = evaluate.restore_state(exp, dst, "last")
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    if size > max_mb * 2**20:
        raise SystemExit(f"{dst}: {size / 2**20:.1f} MB, over the {max_mb} MB limit")
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return {"path": str(dst), "step": step, "params": int(params), "mb": round(size / 2**20, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the trained run's workdir")
    p.add_argument("--name", required=True, help="checkpoints/NAME")
    p.add_argument("--step", type=int, default=None, help="which step (default: the last)")
    p.add_argument(
        "--base", required=True, help="the shipped config it extends: NAME[:arg] of configs/"
    )
    p.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides the run used")
    p.add_argument("--title", required=True, help="first line of config.py's docstring")
    p.add_argument("--command", required=True, help="the command that trained it")
    p.add_argument("--seconds", default="?", help="how long it trained, for the docstring")
    p.add_argument("--machine", default="a 2-core CPU", help="where it trained")
    p.add_argument("--out_dir", default=None, help="where NAME goes (default: checkpoints/)")
    p.add_argument("--max_mb", type=float, default=20.0)
    p.add_argument(
        "--ignore",
        nargs="*",
        default=["data.data_dir"],
        help="config fields that may differ from the run's (default: data.data_dir, a path "
        "on the machine that trained it)",
    )
    args = p.parse_args(argv)
    dst = ship(args)
    print(json.dumps(verify(dst, args.max_mb, set(args.ignore))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
