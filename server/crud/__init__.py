"""Database queries, one module per table family; no web framework imports here."""
