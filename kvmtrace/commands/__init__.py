"""One module per CLI command, each defining a click command named after its module.
They stay thin: parse options, call into tracer/, workload/, dashboard/, analysis/."""
