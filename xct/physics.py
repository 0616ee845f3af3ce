"""X-ray physics: Hounsfield units to linear attenuation (the data issue extends this module).

``MU_WATER_PER_MM`` is water's linear attenuation at an effective energy of about 70 keV
(NIST XCOM: mass attenuation 0.1929 cm^2/g at 70 keV x 1 g/cm^3 = 0.01929 /mm).
"""

from __future__ import annotations

import jax.numpy as jnp

MU_WATER_PER_MM = 0.01929


def hu_to_mu(hu, mu_water_per_mm: float = MU_WATER_PER_MM):
    """Linear attenuation per mm: ``mu_water * (1 + HU / 1000)``, clipped at 0."""
    return jnp.maximum(mu_water_per_mm * (1.0 + jnp.asarray(hu, jnp.float32) / 1000.0), 0.0)
