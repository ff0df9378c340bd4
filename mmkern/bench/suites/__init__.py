"""One module per op family, each with a SUITES list of mmkern.bench.suite.Suite."""
