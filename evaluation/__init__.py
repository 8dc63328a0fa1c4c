"""Data sets, reference models, benchmarks and the ``xaiadv`` command line."""
