"""Human-readable tables of evaluation records."""

from __future__ import annotations

from collections.abc import Sequence

_COLUMNS = (
    ("dataset", "dataset", "{}"),
    ("attack", "attack", "{}"),
    ("defense", "defense", "{}"),
    ("n", "n", "{}"),
    ("clean_acc", "clean %", "{:.2f}"),
    ("robust_acc", "robust %", "{:.2f}"),
    ("mean_tau_clean", "tau clean", "{:.4f}"),
    ("mean_tau_adv", "tau adv", "{:.4f}"),
    ("counterattacked_clean", "CA clean", "{:.1%}"),
    ("counterattacked_adv", "CA adv", "{:.1%}"),
    ("forwards_per_image", "fwd/img", "{:.2f}"),
    ("backwards_per_image", "bwd/img", "{:.2f}"),
)


def format_table(records: Sequence[dict]) -> str:
    """A plain-text table, one row per record; missing values print as '-'."""
    header = [title for _, title, _ in _COLUMNS]
    rows = [
        [fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in _COLUMNS] for r in records
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
