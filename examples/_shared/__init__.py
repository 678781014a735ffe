"""Pieces shared by the examples: flags, byte corpus, byte MLP, loop, reports.

Not an example itself.
"""
