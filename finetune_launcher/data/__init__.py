"""Training data: reading records (records.py), text tokenisation, packing and sampling (text.py), templates
(prompts.py)."""
