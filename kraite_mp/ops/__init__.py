"""Operator and developer commands; nothing in the data path imports this package."""
