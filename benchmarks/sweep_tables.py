"""Recompute the tables of stored sweeps from their own items.csv / seeds.csv (no model is run), e.g. after a
change of the statistics:

    python benchmarks/sweep_tables.py benchmarks/results/sweep_addition benchmarks/results/sweep_reduced
"""
import sys

from emloc.sweeps import rewrite_tables

if __name__ == "__main__":
    for folder in sys.argv[1:]:
        tables = rewrite_tables(folder)
        print(folder, "->", ", ".join(name for name in tables if not tables[name].empty))
