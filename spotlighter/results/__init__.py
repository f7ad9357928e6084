"""Results of Spotlighter and its baselines: ``result.json`` records, log parsing, tables.

Pure Python (no torch, no Dassl). CLI: ``python -m spotlighter.results {base2new,xd,dg} --root OUTPUT``; paired comparison of two methods:
``python -m spotlighter.results compare {base2new,xd,dg} --root OUTPUT --a A --b B``.
"""

from .compare import Comparison, CompareError, compare, compare_all, t_quantile

from .latex import to_latex
from .parse import Result, collect, parse_log, parse_log_text, read_seed_dir
from .published import BaseNew, Published, TransferPublished, load_published, load_transfer_published
from .record import SCHEMA, make_record, read_record, validate_record, write_record
from .stats import Stat, harmonic_mean, summarize
from .tables import Table, base2new_table, build_tables, to_csv, to_markdown, transfer_table

__all__ = [
    "SCHEMA", "BaseNew", "CompareError", "Comparison", "Published", "Result", "Stat", "Table", "TransferPublished",
    "compare", "compare_all", "t_quantile",
    "base2new_table", "build_tables", "collect", "harmonic_mean", "load_published", "load_transfer_published",
    "make_record",
    "parse_log", "parse_log_text", "read_record", "read_seed_dir", "summarize", "to_csv", "to_latex", "to_markdown",
    "transfer_table", "validate_record", "write_record",
]
