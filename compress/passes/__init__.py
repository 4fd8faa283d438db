"""Built-in passes, one package each (config.py: torch-free config; run.py: the work)."""
