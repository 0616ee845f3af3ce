"""Resume under repeated kills (scripts/kill_resume.py): the log and tree comparisons, and the
whole kill-and-restart check as a slow test."""

import json
import random
import time

import numpy as np
import pytest

from scripts import kill_resume


def _rows(*steps, val=(), rate=1.0):
    rows = []
    for s in steps:
        rows.append({"step": s, "train/loss": 1.0 / s, "train/steps_per_s": rate * s})
        if s in val:
            rows.append({"step": s, "validation/psnr": 10.0 + s})
    return rows


def test_timing_keys():
    timing = ["train/steps_per_s", "train/examples_per_s", "eval/wall_time", "train/eta_s"]
    kept = ["train/loss", "validation/psnr", "train/loss_l1", "train/grad_norm", "step"]
    assert all(kill_resume.is_timing_key(k) for k in timing)
    assert not any(kill_resume.is_timing_key(k) for k in kept)


def test_equal_logs_pass_with_other_timings():
    ref = _rows(1, 2, 3, 4, val=(2, 4))
    can = _rows(1, 2, 3, 4, val=(2, 4), rate=7.0)
    assert kill_resume.compare_logs(ref, can).ok


def test_steps_logged_twice_after_a_resume_are_found():
    ref = _rows(1, 2, 3, 4, val=(4,))
    # killed after step 4 had been logged, resumed from the step-3 checkpoint: 4 again
    can = _rows(1, 2, 3, 4, val=(4,)) + _rows(4, val=(4,))
    c = kill_resume.compare_logs(ref, can)
    assert not c.ok
    assert c.duplicates == {("train", 4): 2, ("validation", 4): 2}
    assert not c.missing and not c.extra and not c.differing
    assert "train@4 x2" in c.lines()[0]


def test_missing_extra_differing_and_reordered_rows():
    ref = _rows(1, 2, 3, val=(2,))
    c = kill_resume.compare_logs(ref, _rows(1, 2, 3))
    assert c.missing == [("validation", 2)] and not c.ok

    c = kill_resume.compare_logs(ref, _rows(1, 2, 3, 4, val=(2,)))
    assert c.extra == [("train", 4)] and not c.ok

    changed = _rows(1, 2, 3, val=(2,))
    changed[1]["train/loss"] = np.nextafter(changed[1]["train/loss"], 1.0)  # one ulp
    c = kill_resume.compare_logs(ref, changed)
    assert [k for k, _ in c.differing] == [("train", 2)] and not c.ok

    c = kill_resume.compare_logs(ref, list(reversed(ref)))
    assert c.reordered and not c.ok


def test_unparsable_lines_fail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = _rows(1, 2)
    path.write_text(json.dumps(rows[0]) + "\n" + '{"step": 2, "train/lo' + "\n")
    got, bad = kill_resume.read_log(path)
    assert got == rows[:1] and bad == ['{"step": 2, "train/lo']
    assert not kill_resume.compare_logs(rows[:1], got, bad).ok


def test_compare_trees_is_bitwise():
    a = {"params": {"w": np.array([0.0, 1.0], np.float32)}, "step": np.int32(3)}
    assert "int32[] vs int64[]" in kill_resume.compare_trees(a, {**a, "step": np.int64(3)})[0]
    same = {"params": {"w": np.array([0.0, 1.0], np.float32)}, "step": np.int32(3)}
    assert kill_resume.compare_trees(a, same) == []
    negzero = {"params": {"w": np.array([-0.0, 1.0], np.float32)}, "step": np.int32(3)}
    assert kill_resume.compare_trees(a, negzero)  # equal as numbers, not as bits
    assert "only in the reference" in kill_resume.compare_trees(a, {"params": {}, "step": 3})[0]


def test_checkpoint_folders(tmp_path):
    for name in ("3", "6", "9.orbax-checkpoint-tmp", "notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert kill_resume.checkpoint_steps(tmp_path / "checkpoints") == [3, 6]
    assert kill_resume.partial_checkpoints(tmp_path) == ["checkpoints/9.orbax-checkpoint-tmp"]


def test_watcher_sees_new_rows_not_a_rewritten_history(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in _rows(1, 2, 3, 4, val=(4,))))
    w = kill_resume.Watcher(tmp_path, resume=3)
    w.poll(0.0)
    assert w.events == []
    # resumed from step 3: the trainer cuts its log back to step 3, then logs step 4 again
    tmp = tmp_path / "metrics.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in _rows(1, 2, 3)))
    tmp.replace(log)
    w.poll(1.0)
    assert w.events == []
    with open(log, "a") as f:
        f.write(json.dumps(_rows(4)[0]) + "\n" + '{"step": 4, "valid')
    w.poll(2.0)
    assert [(e.kind, e.step) for e in w.events] == [("train", 4)]
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp").mkdir(parents=True)
    w.poll(3.0)
    assert w.fresh_partial_checkpoints() == ["checkpoints/6.orbax-checkpoint-tmp"]


@pytest.mark.parametrize("resume", [0, 3, 6, 9, 12])
def test_kill_targets_come_after_the_resumed_checkpoint(resume):
    profile = kill_resume.Profile(
        last_step=12,
        train_steps=list(range(1, 13)),
        ckpt_steps=[3, 6, 9, 12],
        val_steps=[4, 8, 12],
        cold={"startup": [30.0], "step": [0.3], "checkpoint": [0.3], "validation": [1.0]},
    )
    rng = random.Random(0)
    for phase in kill_resume.PHASES:
        for advance in (False, True):
            got = kill_resume.choose_target(profile, resume, phase, rng, advance)
            if got is None:
                assert phase != "startup"
                continue
            _, step, (kind, trigger_step), delay_s = got
            assert delay_s >= 0
            if kind == "launch":
                continue
            assert resume < trigger_step <= 12 and step <= min(resume + 6, 12), got


@pytest.mark.slow  # a straight run and 11 restarts of a 12-step run: minutes on 2 cores
def test_training_survives_ten_sigkills(tmp_path, capsys):
    t0 = time.perf_counter()
    status = kill_resume.main(["--workdir", str(tmp_path), "--kills", "10", "--seed", "0"])
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{out}\n({time.perf_counter() - t0:.0f} s)")
    assert status == 0, out
