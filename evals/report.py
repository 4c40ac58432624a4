"""Reports over results stores: Markdown plus a self-contained HTML page with plots.

`write_report(results, compare_with=None, out_dir=...)` reads one results store (and optionally a second one)
and writes ``report.md`` (tables; plots saved as PNG files next to it) and ``report.html`` (the same tables with
the plots embedded as base64 PNG, so the file stands alone). Sections:

- summary per configuration: accuracy with its 95% Wilson interval, tokens (prompt, completion, aborted), calls,
  wall time, per-problem latency, tokens/s, problems/min, failures and budget cuts, and whether it lies on the
  accuracy-versus-tokens Pareto front;
- sample-reuse curves (pass@k, maj@k, weighted@k for k up to N, from each configuration's pool of samples);
- accuracy by difficulty level, when the benchmark has levels;
- comparisons: each configuration against the first one of the file (one file), or configurations with the same
  label across the two files (two files; a single configuration each is compared whatever its label): paired
  accuracy difference with its interval and McNemar's test;
- the reproducibility record of each invocation (packages, engines, model hash, seeds, settings).

Plots (matplotlib, Agg backend, imported only here): accuracy versus mean completion tokens with the Pareto front,
accuracy versus N (the sample-reuse curves), and histograms of completion tokens per problem per configuration.
Without matplotlib (``pip install 'branchwise[reports]'``) the report is written without plots and says so.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .metrics import Comparison, ConfigMetrics, compare, summarize
from .store import ConfigRecord, ResultRow, ResultsStore, RunRecord

__all__ = ["ConfigResults", "Report", "build_report", "load_results", "pareto_front", "summary_json", "write_report"]

logger = logging.getLogger(__name__)


@dataclass
class ConfigResults:
    """One configuration's rows and metrics, from one results file."""

    source: str
    config: ConfigRecord
    rows: list[ResultRow]
    metrics: ConfigMetrics

    @property
    def name(self) -> str:
        return self.config.label


def load_results(path: str | Path) -> tuple[list[ConfigResults], list[RunRecord]]:
    """Read every configuration (with at least one row) and every run record of a results file."""
    with ResultsStore(path, readonly=True) as store:
        out = []
        for config in store.configs():
            rows = store.rows(config.config_id)
            if rows:
                out.append(ConfigResults(str(path), config, rows, summarize(rows)))
        return out, store.runs()


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) no other point beats: cheaper-or-equal and at least as accurate,
    strictly better in one. Sorted by cost."""
    front = []
    for i, (cost, acc) in enumerate(points):
        if math.isnan(cost) or math.isnan(acc):
            continue
        dominated = any(
            (c2 <= cost and a2 >= acc) and (c2 < cost or a2 > acc)
            for j, (c2, a2) in enumerate(points)
            if j != i and not (math.isnan(c2) or math.isnan(a2))
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


@dataclass
class Report:
    """A built report: its Markdown, its HTML and the PNG plots (name -> bytes)."""

    markdown: str
    html: str
    plots: dict[str, bytes]


# ---------------------------------------------------------------------------------------------------------
# Tables


def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _num(x: float, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _ci(ci: tuple[float, float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


class _Doc:
    """Builds Markdown and HTML side by side from the same headings, paragraphs and tables."""

    def __init__(self, title: str) -> None:
        self.md: list[str] = [f"# {title}", ""]
        self.html: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> None:
        self.md += [f"{'#' * level} {text}", ""]
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md += [text, ""]
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        def cell(s: str) -> str:
            return str(s).replace("|", "\\|").replace("\n", " ")

        self.md.append("| " + " | ".join(cell(h) for h in header) + " |")
        self.md.append("|" + "|".join("---" for _ in header) + "|")
        self.md += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        self.md.append("")
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, name: str, data: bytes, alt: str) -> None:
        self.md += [f"![{alt}]({name})", ""]
        encoded = base64.b64encode(data).decode()
        self.html.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}"/></figure>')

    def code(self, text: str) -> None:
        self.md += ["```", text, "```", ""]
        self.html.append(f"<pre>{html.escape(text)}</pre>")

    def render_html(self, title: str) -> str:
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
            "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
            "pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:12px}"
        )
        body = "\n".join(self.html)
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n"
        )


def _summary_rows(results: Sequence[ConfigResults], front: set[int], show_source: bool) -> list[list[str]]:
    rows = []
    for i, r in enumerate(results):
        m = r.metrics
        name = f"{r.name} ({Path(r.source).name})" if show_source else r.name
        rows.append(
            [
                name,
                str(m.n),
                _pct(m.accuracy),
                _ci(m.ci),
                _num(m.mean_completion_tokens),
                f"{m.prompt_tokens:,}",
                f"{m.completion_tokens:,}",
                f"{m.aborted_tokens:,}",
                f"{m.calls:,}",
                _num(m.wall_time_s),
                f"{_num(m.latency_p50_s, 2)} / {_num(m.latency_p90_s, 2)}",
                _num(m.tokens_per_s),
                _num(m.problems_per_min, 2),
                f"{m.errors} / {m.budget_exhausted}",
                "yes" if i in front else "",
            ]
        )
    return rows


_SUMMARY_HEADER = [
    "configuration", "problems", "accuracy", "95% CI", "tokens/problem", "prompt tok", "completion tok",
    "aborted tok", "calls", "wall s", "latency p50/p90 s", "tok/s", "problems/min", "failed / budget-cut",
    "Pareto",
]  # fmt: skip


def _comparison_row(label: str, c: Comparison) -> list[str]:
    ratio = c.tokens_a / c.tokens_b if c.tokens_b else math.nan
    return [
        label,
        str(c.shared),
        _pct(c.accuracy_a),
        _pct(c.accuracy_b),
        f"{100 * c.diff:+.1f}",
        f"[{100 * c.ci[0]:+.1f}, {100 * c.ci[1]:+.1f}]",
        f"{c.a_only_right} / {c.b_only_right}",
        f"{c.p_value:.3g}",
        "yes" if c.significant else "no",
        _num(ratio, 2),
    ]


_COMPARISON_HEADER = [
    "A vs B", "shared", "acc A", "acc B", "diff (points)", "95% CI", "only A right / only B right",
    "McNemar p", "significant", "tokens A/B",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Plots


def _plots(results: Sequence[ConfigResults], front: list[int]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def png(fig: Any) -> bytes:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buffer.getvalue()

    out: dict[str, bytes] = {}
    names = [r.name if len({x.source for x in results}) == 1 else f"{r.name} ({Path(r.source).stem})"
             for r in results]  # fmt: skip

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in zip(names, results, strict=True):
        m = r.metrics
        err = [[100 * (m.accuracy - m.ci[0])], [100 * (m.ci[1] - m.accuracy)]]
        ax.errorbar([m.mean_completion_tokens], [100 * m.accuracy], yerr=err, fmt="o", capsize=3, label=name)
    if len(front) > 1:
        xs = [results[i].metrics.mean_completion_tokens for i in front]
        ys = [100 * results[i].metrics.accuracy for i in front]
        ax.step(xs, ys, where="post", color="black", linewidth=1, alpha=0.6, label="Pareto front")
    ax.set_xlabel("completion tokens per problem (mean)")
    ax.set_ylabel("accuracy (%) with 95% CI")
    ax.set_title("Accuracy versus tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out["accuracy_vs_tokens.png"] = png(fig)

    curved = [(n, r) for n, r in zip(names, results, strict=True) if len(r.metrics.curves.get("maj@k", {})) > 1]
    if curved:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, r) in enumerate(curved):
            color = f"C{i % 10}"
            for metric, style in (("maj@k", "-"), ("weighted@k", ":"), ("pass@k", "--")):
                points = r.metrics.curves[metric]
                ks = sorted(points)
                ax.plot(ks, [100 * points[k] for k in ks], style, color=color, marker="o", markersize=3,
                        label=f"{name} {metric}")  # fmt: skip
        spread = [(r.metrics.samples_per_problem, 100 * r.metrics.accuracy) for r in results]
        ax.scatter([x for x, _ in spread], [y for _, y in spread], marker="D", s=40, color="black", zorder=3,
                   label="configurations (their own answer)")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("N (samples per problem, subsampled from one pool)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy versus N")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        out["accuracy_vs_n.png"] = png(fig)

    fig, axes = plt.subplots(len(results), 1, figsize=(7, 1.8 * len(results) + 0.6), squeeze=False, sharex=True)
    top = max((r.usage_int("completion_tokens") for res in results for r in res.rows), default=1) or 1
    bins = [top * i / 30 for i in range(31)]
    for ax, name, r in zip(axes[:, 0], names, results, strict=True):
        ax.hist([row.usage_int("completion_tokens") for row in r.rows], bins=bins, color="C0", alpha=0.8)
        ax.set_ylabel("problems")
        ax.set_title(name, fontsize=9)
    axes[-1, 0].set_xlabel("completion tokens per problem")
    out["token_histograms.png"] = png(fig)
    return out


# ---------------------------------------------------------------------------------------------------------
# Report


def _describe_runs(doc: _Doc, source: str, runs: Sequence[RunRecord]) -> None:
    for i, run in enumerate(runs):
        status = run.status
        if status == "running":  # nothing recorded its end: a later invocation proves it is not running now
            status = "running, or killed" if i == len(runs) - 1 else "killed: it recorded no end"
        doc.heading(f"{Path(source).name}: invocation {run.run_id} ({status})", 3)
        if run.argv:
            doc.code(" ".join(run.argv))
        repro = run.repro
        env = repro.get("environment", {})
        packages = env.get("packages", {})
        lines = [f"{k} {v}" for k, v in packages.items() if v]
        doc.table(
            ["item", "value"],
            [
                ["recorded", str(repro.get("recorded_at", "-"))],
                ["python / platform", f"{env.get('python', '-')} / {env.get('platform', '-')}"],
                ["cpu", f"{env.get('cpu', '-')} x{env.get('cpu_count', '-')}"],
                ["git", json.dumps(env.get("git"))],
                ["packages", ", ".join(lines) or "-"],
                ["seeds", json.dumps(repro.get("seeds", {}), sort_keys=True)],
            ],
        )
        engines = repro.get("engines", {})
        if engines:
            doc.table(
                ["role", "backend", "model", "weights sha256", "dtype", "seed", "max_num_seqs"],
                [
                    [
                        role,
                        str(e.get("backend")),
                        str(e.get("model")),
                        str(e.get("weights_sha256") or "-"),
                        str(e.get("dtype", "-")),
                        str(e.get("seed", "-")),
                        str(e.get("max_num_seqs", "-")),
                    ]
                    for role, e in engines.items()
                ],
            )
        settings = repro.get("settings")
        if settings:
            doc.code(json.dumps(settings, indent=2, sort_keys=True, default=str))


def build_report(results: str | Path, compare_with: str | Path | None = None, *, plots: bool = True) -> Report:
    """Build the report of a results file (optionally compared with a second one).

    Raises:
        ConfigError: a file is missing or not a results store, or holds no results.
    """
    first, runs_a = load_results(results)
    if not first:
        raise ConfigError(f"{results} holds no results")
    second: list[ConfigResults] = []
    runs_b: list[RunRecord] = []
    if compare_with is not None:
        second, runs_b = load_results(compare_with)
        if not second:
            raise ConfigError(f"{compare_with} holds no results")
    everything = first + second
    benchmarks = sorted({r.config.benchmark for r in everything})
    title = f"branchwise evaluation: {', '.join(benchmarks)}"
    doc = _Doc(title)
    sources = [str(results)] + ([str(compare_with)] if compare_with is not None else [])
    doc.para("Results: " + " vs ".join(sources))

    front = pareto_front([(r.metrics.mean_completion_tokens, r.metrics.accuracy) for r in everything])
    doc.heading("Summary")
    doc.table(_SUMMARY_HEADER, _summary_rows(everything, set(front), show_source=compare_with is not None))
    doc.para(
        "Accuracy intervals are 95% Wilson score intervals. Pareto: no other configuration is at least as accurate "
        "with fewer completion tokens per problem. Wall time is summed over invocations (resumed runs)."
    )
    images = _plot_section(doc, everything, front) if plots else {}
    _sample_reuse_section(doc, everything)
    _levels_section(doc, everything)
    _comparison_section(doc, first, second, compare_with is not None)
    doc.heading("Reproducibility")
    _describe_runs(doc, str(results), runs_a)
    if compare_with is not None:
        _describe_runs(doc, str(compare_with), runs_b)
    return Report("\n".join(doc.md).rstrip() + "\n", doc.render_html(title), images)


def _plot_section(doc: _Doc, everything: list[ConfigResults], front: list[int]) -> dict[str, bytes]:
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("matplotlib is not installed: the report has no plots (pip install 'branchwise[reports]')")
        doc.para("Plots are missing: matplotlib is not installed (pip install 'branchwise[reports]').")
        return {}
    images = _plots(everything, front)
    captions = {
        "accuracy_vs_tokens.png": "Accuracy versus completion tokens per problem",
        "accuracy_vs_n.png": "Accuracy versus N (maj@k solid, weighted@k dotted, pass@k dashed)",
        "token_histograms.png": "Completion tokens per problem",
    }
    for name, data in images.items():
        doc.image(name, data, captions[name])
    return images


def _sample_reuse_section(doc: _Doc, everything: list[ConfigResults]) -> None:
    curved = [r for r in everything if r.metrics.curves.get("pass@k")]
    if not any(len(r.metrics.curves["pass@k"]) > 1 for r in curved):
        return
    doc.heading("Sample reuse: accuracy at k samples, from one pool of N")
    rows = []
    for r in curved:
        c = r.metrics.curves
        for k in sorted(c["pass@k"]):
            rows.append([r.name, str(k), _pct(c["maj@k"][k]), _pct(c["weighted@k"][k]), _pct(c["pass@k"][k]),
                         str(int(c["count@k"][k]))])  # fmt: skip
    doc.table(["configuration", "k", "maj@k", "weighted@k", "pass@k", "problems"], rows)
    doc.para(
        "pass@k is the unbiased estimator 1 - C(n-c,k)/C(n,k). maj@k and weighted@k (votes weighted by trace "
        "confidence) average over every k-subset of a problem's samples when there are at most 400, else over "
        "400 random subsets seeded by the problem id; ties give fractional credit."
    )


def _levels_section(doc: _Doc, everything: list[ConfigResults]) -> None:
    levelled = [r for r in everything if r.metrics.by_level]
    if not levelled:
        return
    doc.heading("Accuracy by difficulty level")
    rows = [
        [r.name, level, str(s.n), _pct(s.accuracy), _ci(s.ci), _num(s.mean_completion_tokens)]
        for r in levelled
        for level, s in r.metrics.by_level.items()
    ]
    doc.table(["configuration", "level", "problems", "accuracy", "95% CI", "tokens/problem"], rows)


def _comparison_section(doc: _Doc, first: list[ConfigResults], second: list[ConfigResults], two: bool) -> None:
    """One file: each configuration against the first. Two files: configurations paired by label."""
    comparisons: list[list[str]] = []
    if not two and len(first) > 1:
        base = first[0]
        for other in first[1:]:
            if {r.problem_id for r in base.rows} & {r.problem_id for r in other.rows}:
                comparisons.append(_comparison_row(f"{other.name} vs {base.name}", compare(other.rows, base.rows)))
    elif two:
        if len(first) == 1 and len(second) == 1:
            pairs = [(first[0], second[0])]
        else:
            by_label = {r.name: r for r in second}
            pairs = [(a, by_label[a.name]) for a in first if a.name in by_label]
        for a, b in pairs:
            if {r.problem_id for r in a.rows} & {r.problem_id for r in b.rows}:
                label = f"{a.name} ({Path(a.source).stem}) vs {b.name} ({Path(b.source).stem})"
                comparisons.append(_comparison_row(label, compare(a.rows, b.rows)))
        if not comparisons:
            doc.para("The two files share no configuration label with common problems: nothing to compare.")
    if comparisons:
        doc.heading("Comparisons (paired, on shared problems)")
        doc.table(_COMPARISON_HEADER, comparisons)
        doc.para(
            "diff = accuracy A - accuracy B in points, with a 95% interval for paired proportions (Newcombe's "
            "hybrid score method); significance by McNemar's exact test (p < 0.05) on the discordant problems."
        )


def write_report(
    results: str | Path, compare_with: str | Path | None = None, *, out_dir: str | Path, plots: bool = True
) -> tuple[Path, Path]:
    """Build the report and write ``report.md`` (with its PNG plots) and a self-contained ``report.html``.

    Returns:
        The Markdown and HTML paths.
    """
    report = build_report(results, compare_with, plots=plots)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in report.plots.items():
        (folder / name).write_bytes(data)
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(report.markdown, encoding="utf-8")
    page.write_text(report.html, encoding="utf-8")
    return md, page


def summary_json(results: str | Path, *, baseline: str | None = None) -> dict[str, Any]:
    """The results as one JSON-ready object, for scripts: every configuration's figures, and ``paired``, each
    other configuration compared with ``baseline`` on the problems both answered.

    Each ``paired`` entry: ``strategy`` and ``baseline`` (configuration labels), ``problems`` (shared),
    ``token_reduction`` (1 - tokens / baseline tokens, prompt + completion), ``accuracy_diff`` with its 95%
    paired interval ``ci_low`` .. ``ci_high`` (fractions), the discordant counts, McNemar's p-value, the token
    totals, the summed per-problem latencies (``latency_s``, ``baseline_latency_s``: modelled seconds for a paced
    replay) and ``speedup`` (baseline latency / strategy latency).

    Args:
        results: the results file.
        baseline: the label of the configuration the others are compared with (default: the first one stored).

    Raises:
        ConfigError: the file holds no results, or no configuration has the label ``baseline``.
    """
    configs, runs = load_results(results)
    if not configs:
        raise ConfigError(f"{results}: no results to summarise")
    by_label = {c.name: c for c in configs}
    if baseline is None:
        base = configs[0]
    elif baseline in by_label:
        base = by_label[baseline]
    else:
        raise ConfigError(f"--baseline {baseline!r} is not a configuration of {results}; have: {sorted(by_label)}")
    paired = []
    for config in configs:
        if config is base:
            continue
        c = compare(config.rows, base.rows)
        paired.append(
            {
                "strategy": config.name,
                "baseline": base.name,
                "problems": c.shared,
                "token_reduction": c.token_reduction,
                "accuracy": c.accuracy_a,
                "baseline_accuracy": c.accuracy_b,
                "accuracy_diff": c.diff,
                "ci_low": c.ci[0],
                "ci_high": c.ci[1],
                "only_strategy_right": c.a_only_right,
                "only_baseline_right": c.b_only_right,
                "p_value": c.p_value,
                "tokens": c.total_tokens_a,
                "baseline_tokens": c.total_tokens_b,
                "latency_s": c.latency_a,
                "baseline_latency_s": c.latency_b,
                "speedup": c.speedup if math.isfinite(c.speedup) else None,
            }
        )
    return {
        "results": str(results),
        "configs": [{"label": c.name, "config_id": c.config.config_id, **c.metrics.to_dict()} for c in configs],
        "paired": paired,
        "runs": len(runs),
    }
