"""Decoding beyond plain greedy, always with greedy's tokens: the calls and their modes (modes.py: mtp, ctc,
ctc+mtp, auto), the speculative decoder (speculative.py), CTC answer drafts (ctc.py), its figures (stats.py) and the
cache rollback it needs on a hybrid Mamba / attention backbone (states.py). Cached greedy decoding is
salm_mtp.generate."""
