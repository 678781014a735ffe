"""Shared test configuration."""

import hypothesis

# Property-based tests (tests/test_properties.py) run the same examples on
# every run and machine: no random seed, no example database, no deadline
# (a first call compiles).
hypothesis.settings.register_profile(
    'deterministic',
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
)
hypothesis.settings.load_profile('deterministic')
