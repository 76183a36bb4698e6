"""Runnable recipes and their configs (installed as ``locore_plugin.recipes`` so that the demo
finds them in any install)."""
