"""Pieces shared by the small examples: byte corpus, byte MLP, training loop.

Not an example itself; ``examples/lm`` does not use it.
"""
