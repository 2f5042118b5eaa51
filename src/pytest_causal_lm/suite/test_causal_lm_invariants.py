"""The built-in invariant suite, collected when a checkpoint is configured.

One test per registered invariant (``pytest_causal_lm.registry``; the built-in ones in ``builtin.py``), named
``test_<key>`` and marked ``causal_lm`` plus its family marker (select with -m
or -k). Each records what it measured as the ``causal_lm`` user property,
which feeds the verdict table and --junitxml.
"""

import pytest_causal_lm as clm

for _invariant in clm.invariants():
    globals()[_invariant.test_name] = clm.suite_test(_invariant)
