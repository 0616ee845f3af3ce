"""Train the organ segmenter whose features define the perceptual loss (``loss.perceptual``).

    python -m scripts.train_segmenter --out=segmenter32 --resolution=32 --phantoms=64 --steps=400

Renders ``--phantoms`` procedural chests (``phantoms.chest_phantom``, seeds from
``--seed``; the quality table's test phantoms start at 2,000,000 and are never used) with
their organ label maps on the acquisition grid of ``--resolution`` / ``--fov_mm`` (the
network's), trains ``xct.models.segmenter.OrganSegmenter`` with Adam on per-voxel cross
entropy (random left-right flips), reports per-organ Dice on ``--held_out`` further
phantoms, and saves it to ``--out`` (``segmenter.msgpack`` + ``segmenter.json``, with the
Dice scores). No real CT and no downloaded weight is involved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for segmenter.msgpack / .json")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--fov_mm", type=float, default=400.0)
    p.add_argument("--phantoms", type=int, default=64, help="training phantoms")
    p.add_argument("--held_out", type=int, default=4, help="phantoms for the Dice report")
    p.add_argument("--version", type=int, default=1, help="phantom version (1 or 2)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=16, help="channels at full resolution")
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1_000_000, help="first phantom seed")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tqdm import tqdm

    from xct import geometry, phantoms, physics
    from xct.models import segmenter

    t0 = time.perf_counter()
    grid = geometry.Acquisition(resolution=args.resolution, fov_mm=args.fov_mm).grid()
    classes = max(phantoms.CHEST_LABELS.values()) + 1
    cts, labels = [], []
    for i in tqdm(range(args.phantoms + args.held_out), desc="phantoms", unit="vol"):
        hu, lab = phantoms.chest_phantom(args.seed + i, grid, version=args.version)
        cts.append(np.asarray(physics.normalize_ct(hu), np.float32))
        labels.append(np.asarray(lab, np.int32))
    cts, labels = np.stack(cts), np.stack(labels)
    train_ct, train_lab = cts[: args.phantoms], labels[: args.phantoms]
    test_ct, test_lab = cts[args.phantoms :], labels[args.phantoms :]

    model = segmenter.OrganSegmenter(classes=classes, width=args.width)
    params = model.init(jax.random.key(0), jnp.asarray(train_ct[:1]))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.learning_rate, min(50, args.steps // 10), args.steps, 0.01 * args.learning_rate
    )
    tx = optax.adam(schedule)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, ct, lab):
        def loss_fn(p):
            logits = model.apply(p, ct)
            return optax.softmax_cross_entropy_with_integer_labels(logits, lab).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    rng = np.random.default_rng(args.seed)
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for _ in bar:
        idx = rng.choice(args.phantoms, args.batch, replace=False)
        ct, lab = train_ct[idx], train_lab[idx]
        if rng.random() < 0.5:  # left-right flip (x is the last axis)
            ct, lab = ct[..., ::-1].copy(), lab[..., ::-1].copy()
        params, opt, loss = step(params, opt, jnp.asarray(ct), jnp.asarray(lab))
        bar.set_postfix(loss=f"{float(loss):.3f}")

    pred = np.asarray(jnp.argmax(model.apply(params, jnp.asarray(test_ct)), -1))
    dice = {}
    for name, k in phantoms.CHEST_LABELS.items():
        t, q = test_lab == k, pred == k
        if t.sum() == 0:
            continue
        dice[name] = round(float(2 * (t & q).sum() / (t.sum() + q.sum())), 3)
    info = {
        "resolution": args.resolution,
        "fov_mm": args.fov_mm,
        "phantom_version": args.version,
        "phantoms": args.phantoms,
        "steps": args.steps,
        "held_out_dice": dice,
        "command": "python -m scripts.train_segmenter "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    segmenter.save(args.out, params, classes=classes, width=args.width, info=info)
    print(f"held-out Dice ({args.held_out} phantoms): {json.dumps(dice)}")
    print(f"saved {args.out}/segmenter.msgpack in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
