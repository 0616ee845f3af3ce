"""Helpers shared by config files (imports only ml_collections)."""

from ml_collections import ConfigDict


def smoke(config: ConfigDict) -> ConfigDict:
    """Shrink any config to a few minutes on a 2-core CPU (mostly compiling): tiny data,
    tiny model, a few steps."""
    c = config
    c.geometry.resolution = 32
    c.geometry.fov_mm = 400.0
    c.data.batch_size = 4  # divisible by the 4 fake test devices
    if c.data.source == "tfds":
        # Its own dataset name: a smoke run never occupies the full run's stored dataset.
        c.data.tfds.dataset = "synthetic_chest/smoke_res32_views8"
        c.data.tfds.split_sizes = {"train": 8, "validation": 2, "test": 2}
    c.data.render.pool_size = 2
    for key, value in (("base_features", 4), ("features", 4), ("num_iters", 2)):
        if key in c.model:
            c.model[key] = value
    # 3 levels: the coarsest grid is 8^3, so bottleneck attention stays cheap.
    for key, value in (("num_levels", 3), ("num_res_blocks", 1), ("num_layers", 2)):
        if key in c.model:
            c.model[key] = value
    if "base_features" in c.disc:
        c.disc.base_features = 4
    c.train.num_steps = 2
    if c.train.get("patch_size", 0):
        c.train.patch_size = 16
        c.train.patch_overlap = 4
    if c.train.get("stages", ""):
        c.train.stages = "32:1,32:1"  # two stages: the second starts from the first
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.eval.batch_size = 4
    return c


def apply_arg(config: ConfigDict, arg: str | None) -> ConfigDict:
    """Config-file argument after the colon: ``smoke`` or nothing."""
    if not arg:
        return config
    if arg == "smoke":
        return smoke(config)
    raise ValueError(f"config argument: expected ':smoke' or nothing, got ':{arg}'")
