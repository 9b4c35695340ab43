"""The embedded default: everything `make demo` needs to run the method end to end on a CPU."""
