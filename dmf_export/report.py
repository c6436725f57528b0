"""Report pages: what ``evaluate``, ``bench`` and ``verify`` found, to look at.

A report is a folder: ``index.html``, the PNG plots and thumbnails it shows (beside it,
in ``img/``) and ``report.json``, the command's ``--json`` object the page was made
from. The page is plain HTML and CSS (no JavaScript, nothing fetched: it opens from
disk) and wraps to a phone's width. Every figure on it is computed here from that JSON;
only the thumbnails need more than the JSON, the pixels of the images it names (a
``pixels(indices)`` callable: ``Evaluation.pixels``).

Plots are matplotlib's (the ``report`` extra), drawn on ``Figure`` objects with the Agg
canvas: no pyplot, no GUI backend, nothing global changed in a user's process.
"""
from __future__ import annotations

import collections
import html
import json
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

from PIL import Image

from dmf_export.errors import DMFExportError
from dmf_export.staging import Staging

INSTALL = "pip install 'dmf-export[report]'"
INDEX, DATA, IMAGES = "index.html", "report.json", "img"
TABLE_CLASSES = 30   # a confusion matrix with more classes is shown as a picture only
THUMB = 84           # thumbnails are stored at most this many pixels wide

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;
max-width:62rem;padding:0 .8rem 2rem;line-height:1.4;color:#1b1b1b;background:#fff}
h1{font-size:1.5rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ccc}
h3{font-size:1.05rem}
img{max-width:100%;height:auto}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.5rem 0;font-variant-numeric:tabular-nums}
th,td{padding:.2rem .5rem;border-bottom:1px solid #ddd;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}
td.name{text-align:left}.paths{overflow-wrap:anywhere}
.fail{color:#b00020;font-weight:600}.pass{color:#11722a;font-weight:600}
.cases{display:flex;flex-direction:column;gap:1rem}
.case{border:1px solid #ddd;border-radius:6px;padding:.5rem}
.thumbs{display:flex;flex-wrap:wrap;gap:.4rem;align-items:flex-start}
.thumbs figure{margin:0;width:88px;font-size:.75rem;overflow-wrap:anywhere}
.thumbs img{width:84px;height:84px;image-rendering:pixelated;display:block}
.query img{outline:3px solid #b00020}
.muted{color:#666;font-size:.9rem}
"""


def require_matplotlib():
    """matplotlib's Figure, or one line saying how to install it."""
    try:
        # optional (the `report` extra) and slow to import: only --report needs it
        from matplotlib.figure import Figure
    except ImportError as err:
        raise DMFExportError(f"--report draws with matplotlib, which is not installed: {INSTALL}") from err
    return Figure


def check_folder(folder) -> Path:
    """Refuse a report folder before any work: a file, a folder that holds something
    other than an earlier report, or a parent that does not exist or is not writable.
    An earlier report there is replaced (all at once, when the new one is complete)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DMFExportError(f"--report {folder}: a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / INDEX).is_file():
        raise DMFExportError(f"--report {folder}: the folder holds files and no earlier report; "
                             "give a new or empty folder")
    Staging([folder], force=True)  # its checks: the parent exists and is writable
    return folder


class _Page:
    """The folder being written: an HTML body, and the images it points to."""

    def __init__(self, folder: Path, title: str):
        self.folder, self.title, self.parts = folder, title, []
        (folder / IMAGES).mkdir(parents=True)
        self.Figure = require_matplotlib()

    def add(self, *parts: str) -> None:
        self.parts.extend(parts)

    def figure(self, width: float, height: float):
        return self.Figure(figsize=(width, height), dpi=100, layout="constrained")

    def plot(self, figure, name: str, alt: str) -> str:
        path = f"{IMAGES}/{name}.png"
        figure.savefig(self.folder / path, format="png")
        return f'<p><img src="{path}" alt="{_e(alt)}"></p>'

    def thumbnail(self, pixels, name: str) -> str:
        path = f"{IMAGES}/{name}.png"
        image = Image.fromarray(pixels)
        if image.width > THUMB:
            image = image.resize((THUMB, round(image.height * THUMB / image.width)), Image.Resampling.BILINEAR)
        image.save(self.folder / path, format="PNG", optimize=True)
        return path

    def write(self, data) -> Path:
        (self.folder / DATA).write_text(json.dumps(data, separators=(",", ":"), allow_nan=True))
        body = "\n".join(self.parts)
        (self.folder / INDEX).write_text(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(self.title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
            f"<h1>{_e(self.title)}</h1>\n{body}\n"
            f"<p class=\"muted\">The numbers above come from <a href=\"{DATA}\">{DATA}</a>.</p>\n"
            "</body></html>\n", encoding="utf-8")
        return self.folder / INDEX


def _write(folder, title: str, data, sections: Callable[[_Page], None]) -> Path:
    """All or nothing: the report is built in a temporary folder beside ``folder`` and
    renamed into place (replacing an earlier report) only once complete."""
    final = check_folder(folder)
    require_matplotlib()
    with Staging([final], force=True) as staging:
        temp = staging.temp(final)
        page = _Page(temp, title)
        sections(page)
        page.write(data)
    return final / INDEX


# -- small HTML helpers ------------------------------------------------------------------

def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence], css: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return (f'<div class="scroll"><table class="{css}"><thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}\n</tbody></table></div>")


def _cell(value) -> str:
    if isinstance(value, tuple) and value[1] == "name":  # a path: its file name, the rest on hover
        return f'<td class="name" title="{_e(value[0])}">{_e(_short(value[0]))}</td>'
    if isinstance(value, tuple):  # (text, css class)
        return f'<td class="{value[1]}">{_e(value[0])}</td>'
    return f"<td>{_e(value)}</td>"


def _paths(names: Iterable[str]) -> str:
    """The full paths the tables name by their file names."""
    items = "".join(f"<li><b>{_e(_short(n))}</b>: {_e(n)}</li>" for n in dict.fromkeys(names)
                    if _short(n) != n)
    return f'<ul class="muted paths">{items}</ul>' if items else ""


def percent(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2%}"


def _num(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def _short(name: str, width: int = 40) -> str:
    """A model's or candidate's label on a plot axis: its file name (and any tag)."""
    head, sep, tag = name.partition(" (")
    short = Path(head).name + (sep + tag if sep else "")
    return short if len(short) <= width else "…" + short[-width + 1:]


# -- evaluate ----------------------------------------------------------------------------

def confusion(evaluation: dict, model: str) -> tuple[list[str], list[list[int]]]:
    """(class names, counts[true][predicted]) over every episode, by class name: the
    episode's labels index its "classes"."""
    names = sorted({c for episode in evaluation["per_episode"] for c in episode["classes"]})
    where = {name: i for i, name in enumerate(names)}
    counts = [[0] * len(names) for _ in names]
    for episode in evaluation["per_episode"]:
        classes = episode["classes"]
        for true, predicted in zip(episode["query_labels"], episode["predicted"][model]):
            counts[where[classes[true]]][where[classes[predicted]]] += 1
    return names, counts


def write_evaluation_report(folder, evaluation: dict,
                            pixels: Callable[[Sequence[int]], object] | None = None) -> Path:
    """The report of an ``evaluate`` run: ``evaluation`` is its ``--json`` object;
    ``pixels(indices)`` gives the images of the hardest queries (None: no thumbnails)."""
    return _write(folder, "dmf-export evaluate", evaluation,
                  lambda page: _evaluation_sections(page, evaluation, pixels))


def _evaluation_sections(page: _Page, ev: dict, pixels) -> None:
    models = [m["path"] for m in ev["models"]]
    page.add(f'<p>{_e(ev["data"])} ({_e(ev["layout"])}), split <b>{_e(ev["split"])}</b>: '
             f'{ev["episodes"]} episodes of {ev["way"]}-way {ev["shot"]}-shot, '
             f'{ev["queries_per_class"]} queries per class, seed {ev["seed"]}, '
             f'{_e(ev["normalization"])} normalisation.</p>')
    page.add("<h2>Accuracy</h2>", _table(
        ["model", "backend", "accuracy", "95 % interval (±)", "episodes/s"],
        [((m["path"], "name"), m["backend"], (percent(m["accuracy"]), "accuracy"),
          (percent(m["ci95"]), "ci95"), _num(m["episodes_per_second"], ".2f")) for m in ev["models"]],
        "models"), _paths(models))
    page.add('<p class="muted">Accuracy over all queries of all episodes; ± is test.py\'s ci95 '
             "(1.96 · std of the per-episode accuracies / √episodes).</p>")
    _histogram(page, ev, models)
    for index, model in enumerate(models):
        names, counts = confusion(ev, model)
        page.add(f"<h2>{_e(_short(model))}: classes</h2>" if len(models) > 1 else "<h2>Classes</h2>")
        _per_class(page, names, counts, index)
        _confusion(page, names, counts, index)
    if len(models) > 1:
        _disagreement(page, ev, models)
    _hardest(page, ev, models, pixels)


def _histogram(page: _Page, ev: dict, models: list[str]) -> None:
    figure = page.figure(7, 3)
    axes = figure.subplots()
    queries = ev["way"] * ev["queries_per_class"]
    edges = [(k - 0.5) / queries for k in range(queries + 2)]
    for model in models:
        values = [episode["accuracy"][model] for episode in ev["per_episode"]]
        axes.hist(values, bins=edges if queries <= 100 else 40, histtype="step", linewidth=1.5,
                  label=_short(model))
    axes.set_xlabel("accuracy of one episode")
    axes.set_ylabel("episodes")
    if len(models) > 1:
        axes.legend(fontsize="small")
    page.add("<h2>Accuracy per episode</h2>",
             page.plot(figure, "episode_accuracy", "histogram of the per-episode accuracy"))


def _per_class(page: _Page, names: list[str], counts: list[list[int]], index: int) -> None:
    rows = [(name, sum(row), row[i], row[i] / sum(row) if sum(row) else float("nan"))
            for i, (name, row) in enumerate(zip(names, counts))]
    figure = page.figure(7, 0.6 + 0.22 * len(names))
    axes = figure.subplots()
    axes.barh(range(len(rows)), [r[3] for r in rows], color="#4c72b0")
    axes.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7 if len(rows) > 25 else 9)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("accuracy of the queries of this class")
    page.add(page.plot(figure, f"class_accuracy_{index}", "accuracy per class"),
             "<details><summary>per-class figures</summary>",
             _table(["class", "queries", "correct", "accuracy"],
                    [(n, q, c, percent(a)) for n, q, c, a in rows], "per-class"),
             "</details>")


def _confusion(page: _Page, names: list[str], counts: list[list[int]], index: int) -> None:
    n = len(names)
    figure = page.figure(min(2.5 + 0.35 * n, 12), min(2 + 0.35 * n, 12))
    axes = figure.subplots()
    shares = [[c / max(sum(row), 1) for c in row] for row in counts]
    shown = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if n <= TABLE_CLASSES:
        axes.set_xticks(range(n), names, rotation=90, fontsize=7)
        axes.set_yticks(range(n), names, fontsize=7)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    figure.colorbar(shown, ax=axes, shrink=0.8, label="share of the true class's queries")
    page.add("<h3>Confusion matrix</h3>",
             page.plot(figure, f"confusion_{index}", "confusion matrix, rows: true class"),
             '<p class="muted">Over all episodes, by class: row = the query\'s class, '
             "column = the class predicted (a class can only be confused with those it shared "
             "an episode with).</p>")
    if n <= TABLE_CLASSES:
        page.add("<details><summary>counts</summary>",
                 _table(["true \\ predicted"] + names + ["queries"],
                        [[name] + row + [sum(row)] for name, row in zip(names, counts)],
                        "confusion"), "</details>")


def _disagreement(page: _Page, ev: dict, models: list[str]) -> None:
    reference = models[0]
    page.add("<h2>Where the models disagree</h2>", _table(
        ["model", "vs", "episodes identical", "queries identical", "accuracy difference",
         "largest in an episode"],
        [((a["model"], "name"), (a["reference"], "name"), f'{a["episodes_identical"]}/{ev["episodes"]}',
          f'{a["queries_identical"]}/{a["queries"]}', f'{100 * a["accuracy_difference"]:.2f} pts',
          f'{100 * a["largest_episode_difference"]:.2f} pts'
          + (f' (episode {a["largest_episode"]})' if a["largest_episode"] is not None else ""))
         for a in ev["agreement"]], "agreement"))
    if all(a["queries_identical"] == a["queries"] for a in ev["agreement"]):
        page.add("<p>Every model predicted the same class as the first for every query.</p>")
        return
    names = sorted({c for episode in ev["per_episode"] for c in episode["classes"]})
    figure = page.figure(7, 0.8 + 0.22 * len(names))
    axes = figure.subplots()
    height = 0.8 / (len(models) - 1)
    for k, model in enumerate(models[1:]):
        differ, total = collections.Counter(), collections.Counter()
        for episode in ev["per_episode"]:
            mine, theirs = episode["predicted"][model], episode["predicted"][reference]
            for label, a, b in zip(episode["query_labels"], mine, theirs):
                total[episode["classes"][label]] += 1
                differ[episode["classes"][label]] += a != b
        axes.barh([i + k * height for i in range(len(names))],
                  [differ[n] / total[n] if total[n] else 0 for n in names], height=height,
                  label=_short(model))
    axes.set_yticks(range(len(names)), names, fontsize=7 if len(names) > 25 else 9)
    axes.invert_yaxis()
    axes.set_xlabel(f"share of the class's queries predicted differently from {_short(reference)}")
    axes.legend(fontsize="small")
    page.add(page.plot(figure, "disagreement", "disagreement per class"))


def _hardest(page: _Page, ev: dict, models: list[str], pixels) -> None:
    cases = ev.get("hardest") or []
    if not cases:
        return
    page.add("<h2>The hardest queries</h2>",
             '<p class="muted">Wrong for the most models, then by how far a wrong class '
             "outscored the true one; each with the support images of its episode (as the "
             "model saw them: resized and cropped).</p>")
    thumbs = {}
    if pixels is not None:
        wanted = sorted({c["index"] for c in cases} | {s["index"] for c in cases for s in c["support"]})
        for index, image in zip(wanted, pixels(wanted)):
            thumbs[index] = page.thumbnail(image, f"image_{index}")
    page.add('<div class="cases">')
    for case in cases:
        guesses = "; ".join(f"{_e(_short(m))}: <b>{_e(case['predicted'][m])}</b>"
                            + (f" (margin {case['margin'][m]:+.3g})" if case["margin"][m] is not None else "")
                            for m in models)
        page.add('<div class="case">',
                 f'<p>Episode {case["episode"]}, query {case["query"]}: true class '
                 f'<b>{_e(case["class"])}</b>; predicted {guesses}'
                 + (f'<br><span class="muted">{_e(case["file"])}</span>' if case.get("file") else "")
                 + "</p>", '<div class="thumbs">',
                 _thumb(thumbs, case, "query: " + case["class"], "query"))
        page.add(*(_thumb(thumbs, s, s["class"]) for s in case["support"]))
        page.add("</div></div>")
    page.add("</div>")


def _thumb(thumbs: dict, image: dict, caption: str, css: str = "") -> str:
    if image["index"] not in thumbs:
        return f"<figure><figcaption>{_e(caption)}</figcaption></figure>"
    return (f'<figure class="{css}"><img src="{thumbs[image["index"]]}" alt="{_e(caption)}" '
            f'width="84" height="84"><figcaption>{_e(caption)}</figcaption></figure>')


# -- bench -------------------------------------------------------------------------------

def write_bench_report(folder, rows: list[dict]) -> Path:
    """The report of a ``bench`` run: ``rows`` is its ``--json`` list of timings."""
    return _write(folder, "dmf-export bench", rows, lambda page: _bench_sections(page, rows))


def _bench_sections(page: _Page, rows: list[dict]) -> None:
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    names = list(dict.fromkeys(r["name"] for r in rows))
    page.add("<h2>Latency per episode</h2>")
    figure = page.figure(7.5, 0.9 + 0.3 * len(names) * len(sizes))
    axes = figure.subplots(len(sizes), 1, squeeze=False, sharex=True)[:, 0]
    for ax, size in zip(axes, sizes):
        mine = [r for r in rows if r["size"] == size]
        y = range(len(mine))
        ax.barh(y, [r["median_s"] * 1e3 for r in mine], color="#4c72b0", label="median")
        ax.plot([r["min_s"] * 1e3 for r in mine], y, "k|", markersize=12, label="min")
        ax.set_yticks(y, [_short(r["name"], 34) for r in mine], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"episode {size}", fontsize=9, loc="left")
    axes[-1].set_xlabel("ms per episode (bar: median, tick: min)")
    axes[0].legend(fontsize="small", loc="lower right")
    page.add(page.plot(figure, "latency", "latency per candidate and episode size"))
    page.add(_table(["episode", "what", "min ms", "median ms", "vs eager", "÷ backbone", "÷ encoder",
                     "÷ fp32 twin", "peak MB", "GPU MB"],
                    [(r["size"], (r["name"], "name"), _num(r["min_s"] * 1e3, ".1f"),
                      _num(r["median_s"] * 1e3, ".1f"), _num(r["speedup"], ".2f", "×"),
                      _num(r["vs_backbone"], ".3f"), _num(r["vs_encoder"], ".3f"),
                      _num(r.get("vs_fp32"), ".3f"), _num(r["peak_mb"], ".0f"),
                      _num(r["gpu_peak_mb"], ".0f")) for r in rows], "timings"))
    page.add(_paths(names))
    page.add('<p class="muted">vs eager: the eager median ÷ this one; ÷ backbone: this median ÷ '
             "the eager backbone's on the same S + Q images; ÷ encoder: ÷ its format's split "
             "encoder alone; ÷ fp32 twin: ÷ the fp32 candidate of the same format. Peak MB: the "
             "process's resident-memory high-water mark above what it held once loaded.</p>")
    ratios = [(key, label) for key, label in (("vs_backbone", "÷ eager backbone"),
                                              ("vs_encoder", "÷ split encoder"),
                                              ("vs_fp32", "÷ fp32 twin"))
              if any(r.get(key) for r in rows)]
    if ratios:
        _bench_bars(page, rows, sizes, ratios, "ratios", "ratio of medians (1 = as fast as the floor)",
                    "median ratios")
    if any(r["peak_mb"] is not None or r["gpu_peak_mb"] is not None for r in rows):
        page.add("<h2>Peak memory</h2>")
        _bench_bars(page, rows, sizes, [("peak_mb", "resident (CPU)"), ("gpu_peak_mb", "CUDA allocated")],
                    "memory", "MB above the loaded process", "peak memory")


def _bench_bars(page: _Page, rows, sizes, keys, name, xlabel, alt) -> None:
    keys = [(k, label) for k, label in keys if any(r.get(k) is not None for r in rows)]
    candidates = [r for r in rows if any(r.get(k) is not None for k, _ in keys)]
    if not candidates:
        return
    figure = page.figure(7.5, 0.9 + 0.3 * len(candidates) * len(keys))
    axes = figure.subplots()
    height = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        axes.barh([i + k * height for i in range(len(candidates))],
                  [r.get(key) or 0 for r in candidates], height=height, label=label)
    axes.set_yticks(range(len(candidates)),
                    [f"{r['size']} {_short(r['name'], 30)}" for r in candidates], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    axes.legend(fontsize="small")
    page.add(page.plot(figure, name, alt))


# -- verify ------------------------------------------------------------------------------

def write_verify_report(folder, data: dict | list[dict]) -> Path:
    """The report of a ``verify`` run (its ``--json`` object), or of several (a list)."""
    reports = [data] if isinstance(data, dict) else data
    return _write(folder, "dmf-export verify", data, lambda page: _verify_sections(page, reports))


def _verify_sections(page: _Page, reports: list[dict]) -> None:
    page.add("<h2>Parity with the eager original</h2>")
    figure = page.figure(7.5, 5.5)
    top, bottom = figure.subplots(2, 1, sharex=True)
    sizes = list(dict.fromkeys(r["size"] for report in reports for r in report["results"]))
    atols = {}
    for report in reports:
        label = f'{_short(report["artifact"], 30)} ({report["backend"]}, {report["precision"]})'
        x = [sizes.index(r["size"]) for r in report["results"]]
        top.plot(x, [max(r["max_abs"], 1e-12) for r in report["results"]], "o-", label=label)
        bottom.plot(x, [max(r.get("tolerance_used") or 0, 1e-6) for r in report["results"]], "o-")
        atols.setdefault(report["tolerance"]["atol"], report["precision"])
    for atol, precision in atols.items():
        top.axhline(atol, linestyle="--", color="#b00020", linewidth=1)
        top.annotate(f"atol {atol:g} ({precision})", (0, atol), textcoords="offset points",
                     xytext=(2, 3), fontsize=7, color="#b00020")
    bottom.axhline(1, linestyle="--", color="#b00020", linewidth=1)
    top.set_yscale("log")
    bottom.set_yscale("log")
    errors = [max(r["max_abs"], 1e-12) for report in reports for r in report["results"]]
    used = [max(r.get("tolerance_used") or 0, 1e-6) for report in reports for r in report["results"]]
    top.set_ylim(min(errors + list(atols)) / 3, max(errors + list(atols)) * 3)
    bottom.set_ylim(min(used + [1]) / 3, max(used + [1]) * 3)
    top.set_ylabel("largest |a − b|")
    bottom.set_ylabel("share of tolerance used")
    bottom.set_xticks(range(len(sizes)), sizes, rotation=30, fontsize=8)
    bottom.set_xlabel("episode size")
    top.legend(fontsize="small")
    page.add(page.plot(figure, "parity", "largest error per episode size against the tolerance"),
             '<p class="muted">Top: the largest absolute difference from the eager scores, with '
             "atol; bottom: the largest |a − b| ÷ (atol + rtol·|b|), the rule applied: at most 1 "
             "passes (with the arg-max agreement).</p>")
    for report in reports:
        tol = report["tolerance"]
        verdict = ("PASS", "pass") if report["passed"] else ("FAIL", "fail")
        page.add(f'<h3>{_e(report["artifact"])}</h3>',
                 f'<p>{_e(report["backend"])} {_e(report["precision"])}: <span class="{verdict[1]}">'
                 f'{verdict[0]}</span> (rtol {tol["rtol"]:g}, atol {tol["atol"]:g}, agreement ≥ '
                 f'{tol["min_agreement"]:.0%})</p>',
                 _table(["episode", "max abs", "max rel", "tolerance used", "agreement", "near-ties",
                         "result"],
                        [(r["size"], f'{r["max_abs"]:.2e}', f'{r["max_rel"]:.2e}',
                          _num(r.get("tolerance_used"), ".3f"), f'{r["agreement"]:.0%}',
                          r["near_ties"], ("ok", "pass") if r["passed"] else ("FAIL", "fail"))
                         for r in report["results"]], "parity"))


# -- demo: verify and bench on one page -------------------------------------------------

def write_demo_report(folder, reports: list[dict], rows: list[dict]) -> Path:
    data = {"verify": reports, "bench": rows}

    def sections(page: _Page) -> None:
        page.add('<p>A seeded checkpoint with <b>random</b> weights: it classifies nothing; '
                 "the page shows that every format matches the original and how fast each runs.</p>")
        _verify_sections(page, reports)
        _bench_sections(page, rows)

    return _write(folder, "dmf-export demo", data, sections)
