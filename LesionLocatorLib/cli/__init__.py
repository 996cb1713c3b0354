"""The lesionlocator command line (argument parsing lives only here)."""
