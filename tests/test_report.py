"""``--report``: the pages of evaluate, bench and verify, read as HTML and opened in a real
headless browser (Debian's chromium; its test skips with the reason where it is absent).

The references are the commands' own ``--json`` output (the page must show the same
figures), the dataset's files (a thumbnail must be the image it names) and counts derived
here from the episodes (the confusion matrix's rows).
"""
from __future__ import annotations

import collections
import html.parser
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import one_error_line, run_cli
from conftest import EXPORT_IMAGE
from dmf_export import report as pages
from dmf_export.bench import Timing, _Candidate, _ratios
from dmf_export.contract import Tolerance
from dmf_export.verify import compare
from fewshot_data import write_folders

EPISODES, QUERIES = 4, 3  # 5-way 1-shot, 3 queries per class: 20 images an episode
CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.usefixtures("two_threads")  # episodes at the speed CI sees


@pytest.fixture(scope="module")
def models(exported):
    """The session's checkpoint and its ONNX export at 32×32."""
    checkpoint, (onnx_path,) = exported(64, 1, "onnx")
    return checkpoint, onnx_path


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    # stored at the artifact's size; --cifar uses images as stored (no resize, no crop)
    return write_folders(tmp_path_factory.mktemp("folders"), classes=8, images=10, size=EXPORT_IMAGE)


def _json_and_report(tmp_path_factory, name, *args):
    pytest.importorskip("matplotlib", reason=f"the report extra is not installed ({pages.INSTALL})")
    folder = tmp_path_factory.mktemp(name) / "report"
    code, output = run_cli(*args, "--json", "--report", folder)
    assert code == 0, output
    lines = output.splitlines()
    assert lines[-1] == f"report: {folder / 'index.html'}"  # stderr's line comes last here
    return json.loads("\n".join(lines[:-1])), folder


@pytest.fixture(scope="module")
def evaluation(models, folder_root, tmp_path_factory):
    """(--json object, report folder) of ONNX and the eager checkpoint on the same episodes."""
    checkpoint, onnx_path = models
    return _json_and_report(tmp_path_factory, "evaluate", "evaluate", onnx_path, checkpoint,
                            "--data", folder_root, "--cifar", "--episodes", EPISODES,
                            "--queries-per-class", QUERIES, "--threads", 2)


@pytest.fixture(scope="module")
def benchmark(models, tmp_path_factory):
    checkpoint, onnx_path = models
    return _json_and_report(tmp_path_factory, "bench", "bench", onnx_path, "-c", checkpoint,
                            "--no-eager", "--sizes", "3w1s2q", "--repeats", 1, "--threads", 2)


@pytest.fixture(scope="module")
def verification(models, tmp_path_factory):
    checkpoint, onnx_path = models
    return _json_and_report(tmp_path_factory, "verify", "verify", onnx_path, "-c", checkpoint,
                            "--sizes", "5w1s4q,2w2s3q")


class _Tables(html.parser.HTMLParser):
    """The page's tables by their class (text of each cell, row by row), its <img> sources
    and every URL it names."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = collections.defaultdict(list)
        self.images, self.urls, self.tags = [], [], collections.Counter()
        self._table, self._row, self._cell = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] += 1
        self.urls += [attrs[key] for key in ("src", "href") if key in attrs]
        if tag == "img":
            self.images.append(attrs.get("src"))
        elif tag == "table":
            self._table = attrs.get("class", "")
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _page(folder) -> _Tables:
    return _Tables((Path(folder) / "index.html").read_text(encoding="utf-8"))


def _rows(page: _Tables, name: str) -> list[list[str]]:
    return page.tables[name][1:]  # without the header


# -- evaluate ----------------------------------------------------------------------------

def test_the_evaluation_page_shows_the_json_figures(evaluation):
    figures, folder = evaluation
    assert json.loads((folder / "report.json").read_text()) == figures  # the page's source
    page = _page(folder)
    shown = [(row[0], row[2], row[3]) for row in _rows(page, "models")]
    assert shown == [(Path(m["path"]).name, f"{m['accuracy']:.2%}", f"{m['ci95']:.2%}")
                     for m in figures["models"]]
    agreement = figures["agreement"][0]
    row = _rows(page, "agreement")[0]
    assert row[2:4] == [f"{agreement['episodes_identical']}/{EPISODES}",
                        f"{agreement['queries_identical']}/{agreement['queries']}"]


def test_confusion_rows_sum_to_each_classes_queries(evaluation, folder_root):
    figures, folder = evaluation
    page = _page(folder)
    # each class's queries: QUERIES in each episode that drew it
    expected = collections.Counter()
    for episode in figures["per_episode"]:
        for name in episode["classes"]:
            expected[name] += QUERIES
    for index, model in enumerate(figures["models"]):
        table = page.tables["confusion"][index * (len(expected) + 1):(index + 1) * (len(expected) + 1)]
        header, rows = table[0], table[1:]
        assert header[1:-1] == sorted(expected)  # columns: every class drawn
        sums = {row[0]: sum(int(cell) for cell in row[1:-1]) for row in rows}
        assert sums == dict(expected)
        assert {row[0]: int(row[-1]) for row in rows} == dict(expected)
        # the diagonal is the model's correct count over every episode
        diagonal = sum(int(row[1 + i]) for i, row in enumerate(rows))
        assert diagonal == sum(e["correct"][model["path"]] for e in figures["per_episode"])
        per_class = {row[0]: (int(row[1]), int(row[2])) for row in
                     page.tables["per-class"][index * (len(expected) + 1) + 1:(index + 1) * (len(expected) + 1)]}
        assert per_class == {row[0]: (expected[row[0]], int(row[1 + i])) for i, row in enumerate(rows)}


def test_the_hardest_queries_show_their_own_images_and_classes(evaluation, folder_root):
    figures, folder = evaluation
    hardest = figures["hardest"]
    assert len(hardest) == 8
    # the first is wrong for as many models as any query is (from the per-query predictions)
    def wrong(episode, q):
        label = episode["query_labels"][q]
        return sum(p[q] != label for p in episode["predicted"].values())
    most = max(wrong(e, q) for e in figures["per_episode"] for q in range(len(e["query_labels"])))
    first = hardest[0]
    assert wrong(figures["per_episode"][first["episode"]], first["query"]) == most
    page = _page(folder)
    for case in hardest:
        for image in [case] + case["support"]:
            file = Path(image["file"])
            assert file.parent.name == image["class"]  # write_folders: the class is the folder
            thumbnail = folder / "img" / f"image_{image['index']}.png"
            assert f"img/image_{image['index']}.png" in page.images
            # --cifar: the model saw the file's pixels as stored
            assert np.array_equal(np.asarray(Image.open(thumbnail).convert("RGB")),
                                  np.asarray(Image.open(file).convert("RGB")))
        assert len(case["support"]) == 5  # 5-way 1-shot


def test_every_image_of_the_pages_is_there_and_nothing_is_fetched(evaluation, benchmark, verification):
    for _, folder in (evaluation, benchmark, verification):
        page = _page(folder)
        assert page.images and page.tags["script"] == 0 and page.tags["link"] == 0
        for url in page.urls:
            assert "://" not in url and not url.startswith("//"), url  # nothing off the folder
            assert (folder / url).is_file(), url


def test_a_foreign_or_impossible_report_folder_is_one_line_before_any_work(models, folder_root, tmp_path):
    pytest.importorskip("matplotlib", reason=f"the report extra is not installed ({pages.INSTALL})")
    checkpoint, onnx_path = models
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    code, output = run_cli("evaluate", onnx_path, "--data", folder_root, "--cifar", "--report", foreign)
    assert code == 2 and "holds files and no earlier report" in one_error_line(output)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    code, output = run_cli("verify", onnx_path, "-c", checkpoint, "--report", tmp_path / "no" / "r")
    assert code == 2 and "does not exist" in one_error_line(output)


def test_without_matplotlib_report_is_one_line_naming_the_extra(models, monkeypatch, tmp_path):
    checkpoint, onnx_path = models
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed: imports fail
    code, output = run_cli("verify", onnx_path, "-c", checkpoint, "--report", tmp_path / "r")
    assert code == 2 and "pip install 'dmf-export[report]'" in one_error_line(output)
    assert not (tmp_path / "r").exists()


def test_a_second_report_replaces_the_first_whole(verification, tmp_path):
    report, _ = verification
    folder = tmp_path / "r"
    pages.write_verify_report(folder, report)
    last = dict(report, results=report["results"][-1:])
    pages.write_verify_report(folder, last)
    assert json.loads((folder / "report.json").read_text()) == last
    assert [row[0] for row in _rows(_page(folder), "parity")] == [report["results"][-1]["size"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporaries left


# -- bench and verify ---------------------------------------------------------------------

def test_the_bench_page_shows_the_json_timings(benchmark):
    rows, folder = benchmark
    assert [r["name"] for r in rows] == ["eager backbone", str(rows[1]["name"])]
    shown = _rows(_page(folder), "timings")
    assert [(r[0], r[1], r[2], r[3], r[5]) for r in shown] == [
        (r["size"], Path(r["name"]).name, f"{r['min_s'] * 1e3:.1f}", f"{r['median_s'] * 1e3:.1f}",
         "–" if r["vs_backbone"] is None else f"{r['vs_backbone']:.3f}") for r in rows]
    assert shown[1][5] != "–"  # the artifact ÷ the backbone


def test_the_verify_page_shows_the_json_errors(verification):
    report, folder = verification
    assert json.loads((folder / "report.json").read_text()) == report
    shown = _rows(_page(folder), "parity")
    assert [(r[0], r[1], r[4], r[6]) for r in shown] == [
        (r["size"], f"{r['max_abs']:.2e}", f"{r['agreement']:.0%}", "ok" if r["passed"] else "FAIL")
        for r in report["results"]]


def test_tolerance_used_is_the_worst_difference_over_its_allowance():
    expected = torch.tensor([[10.0, -2.0]], dtype=torch.float64)
    scores = torch.tensor([[10.0005, -2.0001]], dtype=torch.float64)
    # allowances 1e-4 + 1e-4·10 = 1.1e-3 and 1e-4 + 1e-4·2 = 3e-4: 5e-4/1.1e-3 > 1e-4/3e-4
    result = compare(scores, expected, Tolerance(1e-4, 1e-4, 1.0), "1q")
    assert result.tolerance_used == pytest.approx(5e-4 / 1.1e-3, rel=1e-6)


def test_an_fp16_row_is_divided_by_its_fp32_twin_of_the_same_format_and_kind():
    def candidate(kind, precision, fmt="onnx"):
        return _Candidate(kind, f"{fmt}-{precision}-{kind}", "c", "p", (fmt, precision))

    measured = [(candidate("artifact", "fp32"), Timing("s", "a", 0.1, 0.4)),
                (candidate("artifact", "fp16"), Timing("s", "b", 0.1, 0.1)),
                (candidate("encoder", "fp32"), Timing("s", "c", 0.1, 0.2)),
                (candidate("encoder", "fp16"), Timing("s", "d", 0.1, 0.05)),
                (candidate("artifact", "fp16", "torchscript"), Timing("s", "e", 0.1, 0.3))]
    _ratios(measured)
    assert [row.vs_fp32 for _, row in measured] == [None, 0.25, None, 0.25, None]


def test_a_split_pair_is_divided_by_the_fp32_split_pair_not_the_episode_graph():
    def candidate(precision, graph):
        return _Candidate("artifact", f"onnx-{precision}-{graph}", "c", "p", ("onnx", precision),
                          graph=graph)

    # the fp32 episode graph comes first: a twin by format alone would pick it for both
    measured = [(candidate("fp32", "episode"), Timing("s", "a", 0.1, 0.4)),
                (candidate("fp32", "encoder"), Timing("s", "b", 0.1, 0.2)),
                (candidate("int8", "encoder"), Timing("s", "c", 0.1, 0.05)),
                (candidate("int8", "episode"), Timing("s", "d", 0.1, 0.3))]
    _ratios(measured)
    assert [row.vs_fp32 for _, row in measured] == [None, None, 0.25, pytest.approx(0.75)]


# -- in a real browser -------------------------------------------------------------------

# Added to a copy of a page (the page itself has no script): what the browser made of it.
PROBE = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images: document.images.length, broken,
    overflow: document.documentElement.scrollWidth - window.innerWidth});
  document.body.append(out);
});
</script>"""


def _chromium(tmp_path, url, *args, timeout=90):
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               "--disable-features=NetworkTimeServiceQuerying",
               f"--user-data-dir={tmp_path / 'profile'}", *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it "
                                             "where apt can: apt-get install chromium)")
@pytest.mark.parametrize("which", ["evaluation", "benchmark", "verification"])
def test_the_page_in_a_headless_browser_at_phone_width(which, request, tmp_path):
    figures, folder = request.getfixturevalue(which)
    index = folder / "index.html"
    # a screenshot at a phone's width: it exists and is not blank
    shot = tmp_path / "page.png"
    result = _chromium(tmp_path, index.as_uri(), f"--screenshot={shot}", "--window-size=390,1600",
                       f"--log-net-log={tmp_path / 'net.json'}")
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape[1] == 390 and pixels.std() > 10  # text, tables and plots, not one colour
    # no request of the page's went to the network (the browser's own, to its update and
    # account services, have no file:// page behind them: left aside)
    text = (tmp_path / "net.json").read_text().rstrip()
    log = json.loads(text if text.endswith("}") else text.rstrip(",") + "]}")  # killed mid-write
    fetched = {event["params"]["url"] for event in log["events"]
               if "url" in event.get("params", {})
               and "file://" in event["params"].get("network_isolation_key", "")}
    assert not fetched, sorted(fetched)
    # the rendered page: every image decoded, nothing wider than the phone, and the figures there
    probe = folder / "probe.html"
    probe.write_text(index.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        result = _chromium(tmp_path, probe.as_uri(), "--dump-dom", "--window-size=390,1600",
                           "--virtual-time-budget=5000")
    finally:
        probe.unlink()
    dom = _Tables(result.stdout)
    found = result.stdout.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0]
    state = json.loads(found.replace("&quot;", '"').replace("&amp;", "&"))
    assert state["images"] == len(_page(folder).images) > 0 and state["broken"] == []
    assert state["overflow"] <= 0, f"the page is {state['overflow']} px wider than a 390 px screen"
    if which == "evaluation":
        shown = [(row[2], row[3]) for row in _rows(dom, "models")]
        assert shown == [(f"{m['accuracy']:.2%}", f"{m['ci95']:.2%}") for m in figures["models"]]
    elif which == "benchmark":
        assert [row[3] for row in _rows(dom, "timings")] == [f"{r['median_s'] * 1e3:.1f}" for r in figures]
    else:
        assert [row[1] for row in _rows(dom, "parity")] == [f"{r['max_abs']:.2e}" for r in figures["results"]]


def test_a_model_that_disagrees_gets_the_per_class_plot(evaluation, tmp_path):
    figures, _ = evaluation
    changed = json.loads(json.dumps(figures))
    episode = changed["per_episode"][0]
    second = changed["models"][1]["path"]
    episode["predicted"][second][0] = (episode["predicted"][second][0] + 1) % 5
    changed["agreement"][0]["queries_identical"] -= 1
    page = pages.write_evaluation_report(tmp_path / "r", changed)
    assert (tmp_path / "r" / "img" / "disagreement.png").is_file()
    assert "img/disagreement.png" in _page(page.parent).images
