"""Built-in adapters: one self-contained module per method, each a plugin of its own."""
