"""Test-wide JAX settings: strict rank promotion and several fake CPU devices.

The XLA flag must be set before JAX initialises its backends, hence at import time here.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED_CT = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"


@pytest.fixture(scope="session")
def shared_ct_dir() -> pathlib.Path:
    """``../shared/data/ct`` beside the project root; tests that need it skip without it."""
    if not SHARED_CT.is_dir():
        pytest.skip(f"shared CT folder not found at {SHARED_CT}")
    return SHARED_CT


@pytest.fixture(scope="session")
def num_fake_devices() -> int:
    return len(jax.devices())
