"""Trying an intervention live, nothing written: ``evaluate`` (refusals and KL), ``tryout`` (baseline
vs hooked in one process), ``route`` (the router study) and ``chat``."""
