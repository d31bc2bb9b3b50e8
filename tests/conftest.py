"""Test configuration: 8 simulated CPU devices, set before jax is imported;
the repository root on the path, for ``benchmarks``."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Each flag unless the environment already sets it. The optimisation level:
# the suite is compile-bound, and LLVM's optimisation of the compiled code
# costs more than it saves on these tiny programs (XLA's own passes, the HLO
# and its cost analysis are unchanged).
for _name, _value in (("xla_force_host_platform_device_count", "8"),
                      ("xla_backend_optimization_level", "0")):
  _flags = os.environ.get("XLA_FLAGS", "")
  if _name not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --{_name}={_value}".strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Hypothesis profiles (tests/test_properties.py): small by default, as the
# suite is compile-bound; smaller and reproducible in CI (CI set in the
# environment). HYPOTHESIS_PROFILE picks one explicitly.
try:
  import hypothesis
except ImportError:  # only test_properties.py needs it
  hypothesis = None
if hypothesis is not None:
  hypothesis.settings.register_profile(
      "default", max_examples=3, deadline=None)
  hypothesis.settings.register_profile(
      "ci", max_examples=2, deadline=None, derandomize=True,
      database=None, print_blob=True)
  hypothesis.settings.load_profile(os.environ.get(
      "HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))
