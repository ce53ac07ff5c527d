"""Where the selected elements are: a per-module table and a chart (PNG, or another image format)."""

from __future__ import annotations

import os
import re
from collections import OrderedDict

from allo._atomic import atomic_path

_LAYER = re.compile(r"\.(\d+)\.")
_NUMBER = re.compile(r"(?:(?<=\.)|^)\d+(?=\.|$)")


def kind_of(name: str) -> str:
    """The module with layer numbers folded: model.layers.3.mlp.up_proj.weight -> model.layers.*.mlp.up_proj"""
    return module_of(_NUMBER.sub("*", name))


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _per_group(sel, key):
    groups = OrderedDict()
    for n, shape in sel.shapes.items():
        g = key(n)
        total = 1
        for d in shape:
            total *= d
        s, t = groups.get(g, (0, 0))
        groups[g] = (s + int(sel.indices[n].numel()), t + total)
    return groups


def summary_table(sel, *, by: str = "module") -> str:
    """A text table: per module (``by="module"``), per parameter (``"param"``) or per module kind with
    layer numbers folded (``"kind"``): selected, total, share of the module, share of the selection."""
    key = {"module": module_of, "param": lambda n: n, "kind": kind_of}.get(by)
    if key is None:
        raise ValueError(f"summary(by={by!r}): expected 'module', 'param' or 'kind'")
    groups = _per_group(sel, key)
    n_sel = max(1, sel.num_selected())
    rows = [(g, f"{s:,}", f"{t:,}", f"{100.0 * s / t:.3f}%" if t else "-", f"{100.0 * s / n_sel:.2f}%")
            for g, (s, t) in groups.items()]
    tot_s, tot_t = sel.num_selected(), sel.num_total()
    rows.append(("TOTAL", f"{tot_s:,}", f"{tot_t:,}", f"{100.0 * tot_s / tot_t:.3f}%" if tot_t else "-",
                 "100.00%" if tot_s else "-"))  # nothing selected: no share to speak of
    header = (by, "selected", "elements", "selected/elements", "share of selection")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    meta = ", ".join(f"{k}={v}" for k, v in sel.metadata.items())
    lines = [f"Selection ({meta})" if meta else "Selection"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)
    return "\n".join(lines)


def plot_selection(sel, path: str, *, title: str | None = None) -> None:
    """A chart of the selected fraction per module kind (layer numbers folded) and, for models with
    numbered layers, per layer, written atomically in the format ``path``'s suffix names: ``.png``, or
    another one matplotlib writes (``.pdf``, ``.svg``, ...); a path without a known one is an error."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = os.path.splitext(os.fspath(path))[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:  # matplotlib would otherwise write PNG bytes whatever the name says
        raise ValueError(f"Selection.plot: {path} does not end in an image format's suffix; give a path ending in "
                         f".png (or one of {', '.join('.' + f for f in sorted(formats))})")
    fig = _figure(sel, title)
    with atomic_path(path, "." + fmt, what="Selection.plot") as tmp:
        fig.savefig(tmp, format=fmt, dpi=100)


def _figure(sel, title):
    """The chart of :func:`plot_selection`, a matplotlib Figure."""
    # a Figure of its own, not pyplot: pyplot would need matplotlib.use("Agg"), which switches the
    # backend of the user's whole session (a notebook's inline plots), and keeps figures in its registry
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    kinds = _per_group(sel, kind_of)
    layers = _per_group(sel, lambda n: int(m.group(1)) if (m := _LAYER.search(n)) else -1)
    layers.pop(-1, None)
    ncols = 2 if layers else 1
    fig = Figure(figsize=(7 * ncols, max(3, 0.3 * len(kinds) + 1.5)))
    axes = fig.subplots(1, ncols, squeeze=False)
    ax = axes[0][0]
    labels = list(kinds)
    ax.barh(range(len(labels)), [100.0 * s / t if t else 0 for s, t in kinds.values()])
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("% of the module's elements selected")
    ax.set_title("per module kind")
    if layers:
        ax = axes[0][1]
        idx = sorted(layers)
        ax.bar(idx, [100.0 * layers[i][0] / layers[i][1] if layers[i][1] else 0 for i in idx])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layer numbers: no tick at 0.5
        ax.set_xlabel("layer")
        ax.set_ylabel("% of the layer's elements selected")
        ax.set_title("per layer")
    meta = sel.metadata
    fig.suptitle(title or f"selection: ratio={meta.get('ratio')} exclude={meta.get('exclude_ratio')} "
                          f"{meta.get('granularity', '')} ({meta.get('score_source', '')})")
    fig.tight_layout()
    return fig
