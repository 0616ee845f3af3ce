"""``scripts/train_atlas_net.py train``: folds, the shipped model and the report."""

from __future__ import annotations

import csv
import datetime
import json
import pathlib
import sys
import time

import numpy as np

BASELINES = ("tv", "tv_support", "atlas", "atlas_tv")


def _score(hu, case) -> dict:
    from xct import scoring

    return scoring.score_volume(np.asarray(hu, np.float32), case["truth_hu"], case["body"])


def _hu(mu, case) -> np.ndarray:
    from xct import physics

    return np.asarray(physics.mu_to_hu(np.asarray(mu), case["meta"]["mu_water"]))


def settings_of(args):
    from xct import atlas_net

    return atlas_net.TrainSettings(
        steps=args.steps,
        batch=args.batch,
        patch=args.patch,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        body_weight=args.body_weight,
        width=args.width,
        depth=args.depth,
        seed=args.seed,
    )


def _train_on(cases, held_out: str | None, args, label: str):
    from xct import atlas_net

    xs = [atlas_net.case_inputs(c, held_out) for c in cases]
    ys = [atlas_net.case_target(c) for c in cases]
    bs = [c["body"] for c in cases]
    s = settings_of(args)
    t = time.perf_counter()

    def log(i, loss):
        el = time.perf_counter() - t
        eta = el / (i + 1) * (s.steps - i - 1)
        print(
            f"  [{label}] step {i + 1}/{s.steps} loss {loss:.5f} ({el:.0f} s, ETA {eta:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    model, params, losses = atlas_net.train(xs, ys, bs, s, log=log)
    return model, params, losses, time.perf_counter() - t


def run(args) -> None:
    from xct import atlas_net, scoring

    files = sorted((pathlib.Path(args.out) / "cases").glob("*.npz"))
    if not files:
        raise ValueError(f"{args.out}/cases: no cases (run the 'cases' stage first)")
    cases = [atlas_net.load_case(f) for f in files]
    if not args.with_phantoms:
        cases = [c for c in cases if not c["meta"]["chest"].startswith("phantom_")]
    chests = sorted(
        {c["meta"]["chest"] for c in cases if not c["meta"]["chest"].startswith("phantom_")}
    )
    weights = {json.dumps(atlas_net.weights_of(c["meta"]), sort_keys=True) for c in cases}
    if len(weights) > 1:
        raise ValueError(
            f"{args.out}/cases: made at different input weights {sorted(weights)} (rerun the "
            "'cases' stage: it brings every case to atlas_net.INPUT_WEIGHTS)"
        )
    input_weights = json.loads(weights.pop())
    folds = args.folds or chests
    print(f"{len(cases)} cases of {len(chests)} chests; folds: {len(folds)}", file=sys.stderr)
    rows, train_s = [], {}
    rows_file = pathlib.Path(args.out) / "fold_rows.jsonl"
    done = {}  # a rerun keeps the folds a killed run finished (model and rows written)
    if rows_file.is_file():
        for line in rows_file.read_text().splitlines():
            r = json.loads(line)
            done.setdefault(r["chest"], []).append(r)
    for k in folds:
        fold_dir = pathlib.Path(args.out) / "folds" / k
        if k in done and (fold_dir / "atlas_net.json").is_file():
            rows += done[k]
            train_s[k] = json.loads((fold_dir / "atlas_net.json").read_text())["train_seconds"]
            print(f"  fold {k}: done before, kept", file=sys.stderr)
            continue
        train_cases = [c for c in cases if c["meta"]["chest"] != k]
        model, params, losses, secs = _train_on(train_cases, k, args, f"fold {k}")
        train_s[k] = secs
        atlas_net.save(
            fold_dir,
            params,
            width=args.width,
            depth=args.depth,
            info={
                "trained_on": [c for c in chests if c != k],
                "held_out": k,
                "cases": len(train_cases),
                "steps": args.steps,
                "seed": args.seed,
                "train_seconds": round(secs, 1),
                "final_loss": float(np.mean(losses[-50:])),
                "input_weights": input_weights,
            },
        )
        for c in cases:
            m = c["meta"]
            if m["chest"] != k:
                continue
            t = time.perf_counter()
            hu = atlas_net.predict(model, params, atlas_net.case_inputs(c)) * 1e3
            net_s = time.perf_counter() - t
            base = {"chest": k, "views": m["views"], "variant": m["variant"]}
            for method in BASELINES:
                rows.append({**base, "method": method, **_score(_hu(c[method], c), c)})
            rows.append({**base, "method": "atlas_net", **_score(hu, c), "net_seconds": net_s})
            a, n = rows[-2]["psnr_body"], rows[-1]["psnr_body"]
            print(
                f"  {k} {m['views']}v #{m['variant']}: atlas_tv {a:.2f} -> atlas_net {n:.2f} "
                f"dB inside the body",
                file=sys.stderr,
                flush=True,
            )
        with rows_file.open("a") as f:
            for r in rows:
                if r["chest"] == k:
                    f.write(json.dumps(r) + "\n")
    wins = auto_views(rows, folds, chests)
    print(f"atlas_net beat atlas_tv at views {wins} (every fold)", file=sys.stderr)
    for k in folds:  # the fold models carry the decision too (scripts/cli_check.py runs them)
        f = pathlib.Path(args.out) / "folds" / k / "atlas_net.json"
        meta = json.loads(f.read_text())
        meta.update(auto_views=wins, benchmark=args.report or "scripts/train_atlas_net.py")
        f.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if args.ship:
        model, params, losses, secs = _train_on(cases, None, args, "all chests")
        info = {
            "auto_views": wins,
            "benchmark": args.report or "scripts/train_atlas_net.py",
            "trained_on": chests,
            "cases": len(cases),
            "views": sorted({c["meta"]["views"] for c in cases}),
            "steps": args.steps,
            "seed": args.seed,
            "train_seconds": round(secs, 1),
            "date": datetime.date.today().isoformat(),
            "command": args.command,
            "input_weights": input_weights,
        }
        info["machine"] = scoring.machine_line()
        atlas_net.save(
            args.ship,
            params,
            width=args.width,
            depth=args.depth,
            info=info,
            settings=settings_of(args),
        )
        print(f"wrote {args.ship}", file=sys.stderr)
    if args.report:
        write_report(pathlib.Path(args.report), rows, train_s, args, scoring.machine_line())


def auto_views(rows, folds, chests) -> list[int]:
    """The numbers of views at which atlas_net's mean inside-body PSNR beat atlas_tv's
    over every chest's fold, on the table's X-rays (variant 0) and on all cases; none
    unless every chest was a fold (``--method auto`` runs it there)."""
    if sorted(folds) != sorted(chests):
        return []
    out = []
    for v in sorted({r["views"] for r in rows}):
        ok = all(
            _mean(rows, "atlas_net", v, "psnr_body", v0)[0]
            > _mean(rows, "atlas_tv", v, "psnr_body", v0)[0]
            for v0 in (True, False)
        )
        if ok:
            out.append(v)
    return out


def _mean(rows, method, views, key, variant0=True):
    v = [
        r[key]
        for r in rows
        if r["method"] == method and r["views"] == views and (r["variant"] == 0 or not variant0)
    ]
    return (float(np.mean(v)), len(v)) if v else (float("nan"), 0)


def write_report(out: pathlib.Path, rows, train_s, args, machine: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "rows.csv").open("w", newline="") as f:
        keys = sorted({k for r in rows for k in r})
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    views = sorted({r["views"] for r in rows})
    methods = (*BASELINES, "atlas_net")
    md = [
        "# atlas_net: folds over the shared chests, clinical X-rays",
        "",
        f"Machine: {machine}; {datetime.date.today().isoformat()}.",
        "",
        f"Command: `{args.command}`",
        "",
    ]
    summary = {}
    for variant0, title in (
        (True, "the quality table's X-rays (variant 0)"),
        (False, "every case of the held-out chest (deformed ones too)"),
    ):
        md += [
            f"## PSNR dB inside the body | whole cube, primary definition: {title}",
            "",
            "| method | " + " | ".join(f"{v} views" for v in views) + " |",
            "|---" * (1 + len(views)) + "|",
        ]
        for m in methods:
            cells = []
            for v in views:
                b, n = _mean(rows, m, v, "psnr_body", variant0)
                wh, _ = _mean(rows, m, v, "psnr", variant0)
                x2, _ = _mean(rows, m, v, "x2ct_psnr_body", variant0)
                cells.append(f"{b:.2f} \\| {wh:.2f} (x2ct {x2:.2f}; n={n})")
                summary.setdefault("variant0" if variant0 else "all", {}).setdefault(m, {})[
                    str(v)
                ] = {"psnr_body": b, "psnr": wh, "x2ct_psnr_body": x2, "n": n}
            md.append(f"| {m} | " + " | ".join(cells) + " |")
        md.append("")
    md += ["## Per chest, variant 0: atlas_tv -> atlas_net inside the body (dB)", ""]
    for k in sorted({r["chest"] for r in rows}):
        parts = []
        for v in views:
            a, n = (
                [
                    r["psnr_body"]
                    for r in rows
                    if (r["chest"], r["views"], r["variant"], r["method"]) == (k, v, 0, method)
                ]
                for method in ("atlas_tv", "atlas_net")
            )
            if a and n:
                parts.append(f"{v}v {a[0]:.2f} -> {n[0]:.2f} ({n[0] - a[0]:+.2f})")
        md.append(f"- {k}: " + "; ".join(parts) + f" (fold trained in {train_s.get(k, 0):.0f} s)")
    (out / "README.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "train_seconds": train_s,
                "steps": args.steps,
                "width": args.width,
                "depth": args.depth,
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    print("\n".join(md))
