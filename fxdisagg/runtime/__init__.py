"""Runtimes that execute role programs: in-process (threads) and distributed (processes)."""
