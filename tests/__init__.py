"""The test suite. ``FAST_COMPILE``: the XLA flags every test compiles with (tests/conftest.py
appends them to XLA_FLAGS; subprocess tests that set their own XLA_FLAGS include them).

Almost every test is compilation: XLA's backend passes and code generation take longer than
the tiny programs run. Two debug options of XLA:CPU cut that (slower code, which tests do not
time). They may round differently from XLA's defaults (-O0 does: tests/lopt/test_velo.py), but
both sides of every comparison in the suite compile with the same flags:
- ``--xla_backend_optimization_level=0``: no backend optimisation passes;
- ``--xla_cpu_use_fusion_emitters=false``: XLA:CPU's older elemental emitter for fusions
  instead of the MLIR fusion emitters. Measured at -O0 (tests/test_outer.py's PES config, first
  outer step in a fresh process, persistent cache off): the outer step's XLA compile 2.5 s ->
  1.1 s, the whole first step 6.2 s -> 4.3 s. Users' programs keep XLA's defaults: at full
  optimisation the older emitter compiles W1 slower (first two outer steps 7.7-8.2 s -> 13-15 s)
  and runs it no faster.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
