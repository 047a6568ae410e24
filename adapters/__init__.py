"""Ready-made adapters, installed as ``pop3frame.adapters``.

Each module is a small, complete example of an :class:`~pop3frame.AdapterBase`.
"""
