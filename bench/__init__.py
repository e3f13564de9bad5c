"""Benchmark of infobip-relay against Postfix: see bench/README.md (``python -m bench run``)."""
