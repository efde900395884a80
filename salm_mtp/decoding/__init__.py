"""Decoding beyond plain greedy: MTP self-speculative decoding (speculative.py) and the cache rollback it
needs on a hybrid Mamba / attention backbone (states.py). Cached greedy decoding is salm_mtp.generate."""
