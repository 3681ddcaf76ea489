import os

from hypothesis import HealthCheck, settings

# One persistent pool of gloo ranks per world size serves every multi-process test
# (shardtensor.testing.run); hypothesis examples are cheap round trips to it.
settings.register_profile(
    "default", max_examples=int(os.environ.get("ST_EXAMPLES", "20")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=bool(os.environ.get("CI")))
settings.load_profile("default")
