"""A byte-level Transformer language model trained with AdamW and AdEMAMix.

Run ``python -m examples.lm --help`` from the repository root; see README.md.
"""
