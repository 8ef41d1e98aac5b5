"""KV page bookkeeping: reference-counted pages and the prefix cache over them (plain Python, no torch)."""
from braidinfer.kv.page_manager import PageManager
from braidinfer.kv.prefix_tree import PrefixNode, PrefixTree

__all__ = ["PageManager", "PrefixNode", "PrefixTree"]
