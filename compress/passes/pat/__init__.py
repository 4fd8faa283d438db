"""``pat``: pruning-aware tuning of the hidden dimension (issue 18). The modules and their
materialization are in :mod:`.hsm`; the pass (config, training, registration) is not built yet,
so nothing registers here."""
