"""Thin Orbax wrapper: the last N checkpoints, the best by validation PSNR, data state beside.

Two managers under the workdir: ``checkpoints/`` keeps the last ``keep`` saves (asynchronous)
and ``best/`` keeps the single best by ``metrics["val_psnr"]``. Each save holds the train
state (a pytree) and, beside it, the data iterator's state (JSON), so a resumed run sees
exactly the data it would have seen.
"""

from __future__ import annotations

import pathlib
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir, *, keep: int = 3, async_save: bool = True):
        root = pathlib.Path(workdir).absolute()
        self.last = ocp.CheckpointManager(
            root / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save
            ),
        )
        self.best = ocp.CheckpointManager(
            root / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda m: float(m["val_psnr"]),
                best_mode="max",
                keep_checkpoints_without_metrics=False,
                enable_async_checkpointing=async_save,
            ),
        )

    @staticmethod
    def _args(state, data_state):
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
        )

    def save(
        self, step: int, state, data_state: dict | None = None, *, force: bool = False
    ) -> None:
        # The best checkpoint of this step (validated first) must be committed before
        # checkpoints/ says the step is done: a run resumed from it does not validate this
        # step again, so a kill in between would lose it.
        self.best.wait_until_finished()
        self.last.save(step, args=self._args(state, data_state), force=force)

    def save_best(self, step: int, state, metrics: dict, data_state: dict | None = None) -> None:
        """Offer ``state`` as the best; a step already saved (a resumed run validating the
        same step again, with the same result) is kept as it is."""
        if step in self.best.all_steps():
            return
        self.best.save(
            step,
            args=self._args(state, data_state),
            metrics={k: float(v) for k, v in metrics.items()},
        )

    def latest_step(self) -> int | None:
        return self.last.latest_step()

    def restore(
        self, abstract_state, step: int | None = None, *, which: str = "last"
    ) -> tuple[Any, dict, int] | None:
        """``(state, data_state, step)`` of ``step`` (default: latest / best), or ``None``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings), e.g.
        from ``jax.eval_shape``; the restored arrays take those shardings.
        """
        mgr = self.last if which == "last" else self.best
        if step is None:
            step = mgr.latest_step() if which == "last" else mgr.best_step()
        if step is None:
            return None
        out = mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["data"] or {}), int(step)

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.last.close()
        self.best.close()
