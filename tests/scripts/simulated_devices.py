"""Run by tests/test_sharding.py on 8 simulated CPU devices: every sharding check, one process.

Each check is a module beside this one with a ``report()`` function (each also
runs alone). One process pays JAX's start once for all of them. A check that
raises is reported with its traceback under ``"error"``, and the others still
run. Prints one ``REPORT {json}`` line: each check's report by module name.
"""

import importlib
import json
import traceback

# sharded_init first: it counts the warnings raised while it runs
CHECKS = (
    "sharded_init",
    "optax_sharding_check",
    "held_signs_sharding_check",
    "stacked_sharding_check",
    "sharded_check",
)


def main():
  reports = {}
  for name in CHECKS:
    try:
      reports[name] = importlib.import_module(name).report()
    except Exception:  # noqa: BLE001 - the check's test shows it
      reports[name] = {"error": traceback.format_exc()[-5000:]}
  print("REPORT " + json.dumps(reports))


if __name__ == "__main__":
  main()
