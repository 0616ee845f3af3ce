import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import geometry, input_pipeline, sharding


def _fake_source(n=10, views=8, r=8):
    rng = np.random.default_rng(0)
    return [
        {
            "id": f"ex{i}",
            "ct_hu": rng.integers(-1000, 1000, (r, r, r)).astype(np.int16),
            "drr": np.full((views, r, r), float(i), np.float32),
            "angles_deg": geometry.nested_view_angles(views).astype(np.float32),
            "sod_mm": np.float32(1000),
            "sdd_mm": np.float32(1500),
            "pixel_mm": np.ones(2, np.float32),
            "spacing_mm": np.ones(3, np.float32),
        }
        for i in range(n)
    ]


def _ids(batch):
    from xct import physics

    return tuple(
        np.round(np.asarray(physics.denormalize_drr(batch["drr"][:, 0, 0, 0]))).astype(int)
    )


def _make(source, seed=0, **kw):
    t = input_pipeline.ExampleTransform(
        num_views=kw.pop("num_views", 2), view_selection=kw.pop("view_selection", "first")
    )
    return input_pipeline.make_dataset(
        source,
        batch_size=kw.pop("batch_size", 3),
        transform=t,
        seed=seed,
        train=kw.pop("train", True),
        **kw,
    )


def test_deterministic_reshuffled_per_epoch_and_exactly_resumable():
    src = _fake_source()
    a = [_ids(b) for b, _ in zip(_make(src).to_iter_dataset(), range(8), strict=False)]
    b = [_ids(b) for b, _ in zip(_make(src).to_iter_dataset(), range(8), strict=False)]
    assert a == b
    assert a != [
        _ids(b) for b, _ in zip(_make(src, seed=1).to_iter_dataset(), range(8), strict=False)
    ]
    it = iter(_make(src).to_iter_dataset())
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [_ids(next(it)) for _ in range(3)]
    it2 = iter(_make(src).to_iter_dataset())
    it2.set_state(state)
    assert [_ids(next(it2)) for _ in range(3)] == expected


def test_batches_are_read_ahead_while_the_step_runs():
    """A slow source (20 ms per example read): with a step of the same length, the next
    batches are read in grain's threads meanwhile, so 6 steps take about 6 step times,
    not 6 step times plus 6 batches of reads; and the data are those of a plain read."""
    import time

    class Slow(list):
        def __getitem__(self, i):
            time.sleep(0.02)
            return super().__getitem__(i)

    source = _fake_source(12)
    it = input_pipeline.iterate(_make(Slow(source), batch_size=3))
    first = next(it)
    time.sleep(0.3)  # the first step compiling: batches are read meanwhile
    t0 = time.perf_counter()
    got = [first]
    for _ in range(5):
        time.sleep(0.06)  # a step as long as reading its batch
        got.append(next(it))
    waited = time.perf_counter() - t0 - 5 * 0.06
    assert waited < 0.15, f"waited {waited:.3f} s for batches (read synchronously: about 0.30 s)"
    plain = input_pipeline.iterate(_make(source, batch_size=3))
    assert [_ids(b) for b in got] == [_ids(next(plain)) for _ in got]


def test_epochs_cover_each_example_once():
    src = _fake_source(n=6)
    ds = _make(src, batch_size=2, num_epochs=2)
    seen = [i for b in ds.to_iter_dataset() for i in _ids(b)]
    assert (
        len(seen) == 12
        and sorted(seen[:6]) == list(range(6))
        and sorted(seen[6:]) == list(range(6))
    )
    assert seen[:6] != seen[6:]  # reshuffled


def test_hosts_read_disjoint_shards():
    src = _fake_source(n=10)
    got = []
    for host in range(2):
        ds = _make(src, batch_size=2, train=False, shard_index=host, shard_count=2)
        got.append({i for b in ds.to_iter_dataset() for i in _ids(b)})
    assert got[0].isdisjoint(got[1]) and got[0] | got[1] == set(range(10))


def test_two_hosts_make_the_global_batches_of_one_host():
    """Each host keeps every other example of the same global stream: global batch k has
    the same examples (and the same augmentation draws) on 1 or 2 hosts."""
    src = _fake_source(n=12)
    one = [b for b, _ in zip(_make(src, batch_size=4).to_iter_dataset(), range(7), strict=False)]
    hosts = [
        [
            b
            for b, _ in zip(
                _make(src, batch_size=4, shard_index=h, shard_count=2).to_iter_dataset(),
                range(7),
                strict=False,
            )
        ]
        for h in range(2)
    ]
    for k in range(7):
        assert hosts[0][k]["drr"].shape[0] == 2
        merged = {i: None for h in range(2) for i in _ids(hosts[h][k])}
        assert sorted(merged) == sorted(_ids(one[k])), k
        both = np.concatenate([hosts[0][k]["drr"], hosts[1][k]["drr"]])
        order = np.argsort(np.concatenate([_ids(hosts[0][k]), _ids(hosts[1][k])]))
        np.testing.assert_array_equal(both[order], one[k]["drr"][np.argsort(_ids(one[k]))])
    with pytest.raises(ValueError, match="not divisible by 2 hosts"):
        _make(src, batch_size=3, shard_index=0, shard_count=2)


def test_view_selection_and_bad_view_count():
    ex = _fake_source(n=1)[0]
    ex["drr"] = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 8, 8), np.float32)
    first = input_pipeline.ExampleTransform(num_views=3)(ex)
    np.testing.assert_allclose(first["angles_deg"], geometry.nested_view_angles(8)[:3])
    rnd = input_pipeline.ExampleTransform(num_views=4, view_selection="random")(
        ex, np.random.default_rng(3)
    )
    assert rnd["drr"].shape == (4, 8, 8) and len(set(rnd["angles_deg"].tolist())) == 4
    with pytest.raises(ValueError, match="num_views"):
        input_pipeline.ExampleTransform(num_views=9)(ex)


def test_shard_batch_splits_the_batch_over_the_data_axis():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    mesh = sharding.make_mesh({"data": 4})
    batch = next(iter(_make(_fake_source(), batch_size=4).to_iter_dataset()))
    g = sharding.shard_batch(batch, mesh)
    assert g["drr"].shape == (4, 2, 8, 8)
    assert len(g["drr"].sharding.device_set) == 4
    np.testing.assert_allclose(np.asarray(g["drr"]), batch["drr"])


@pytest.mark.parametrize("views", [1, 3])
def test_render_batch_on_device_any_view_count(views):
    acq = geometry.Acquisition(16, 128.0, pixel_mm=12.0)
    hu = jnp.full((2, 16, 16, 16), -1000.0).at[:, 4:12, 4:12, 4:12].set(40.0)
    f = jax.jit(
        lambda k, x: input_pipeline.render_batch(
            k, x, acq, num_views=views, elastic_mm=4.0, photons=1e5
        )
    )
    out = f(jax.random.key(0), hu)
    again = f(jax.random.key(0), hu)
    assert out["drr"].shape == (2, views, 16, 16) and out["angles_deg"].shape == (2, views)
    np.testing.assert_array_equal(np.asarray(out["drr"]), np.asarray(again["drr"]))
    assert float(out["drr"].max()) > 0
    assert not np.allclose(
        np.asarray(f(jax.random.key(1), hu)["angles_deg"]), np.asarray(out["angles_deg"])
    )
