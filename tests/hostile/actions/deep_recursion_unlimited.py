"""Unbounded recursion after lifting the recursion limit: frames grow until memory runs out."""
import sys


def down(n):
    return down(n + 1) + 1


def on_execute(event, api):
    sys.setrecursionlimit(1 << 30)
    down(0)
