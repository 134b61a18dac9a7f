"""The results pages: a read-only HTML view of what the local ClearML server holds.

The SDK prints ``ClearML results page: <web host>/projects/<project>/experiments/<task>/output/log``
on every ``Task.init``; these pages answer that link and the other paths of ClearML's web app:

* ``/`` and ``/projects``: projects, recent experiments, registered models.
* ``/projects/<project>`` (or ``.../experiments``): a project's experiments and models.
* ``/projects/<project>/experiments/<task>/<tab>``: one experiment. The tab follows the web
  app's sub-paths: ``output/log`` (console), ``execution``, ``hyper-params/...``,
  ``configuration/...``, ``artifacts/...``, ``info-output/metrics/scalar`` (scalar charts),
  ``info-output/metrics/plots`` (plots: the attention heatmaps, by iteration),
  ``info-output/debugImages``; anything else shows the overview (status, metrics, models).
* ``/projects/<project>/models`` and ``/projects/<project>/models/<model>/...``: models, one model.
* ``/compare?ids=a,b`` (``?ids=a&ids=b`` from the pages' compare form, or the web app's
  ``/projects/*/compare-experiments;ids=a,b/...``):
  the scalar curves of several experiments overlaid, and their differing hyperparameters.
* ``/static/plotly.min.js``: plotly.js from the ``plotly`` package (no CDN, no network), and
  ``/static/figures.js``, which draws a page's figures from its JSON block.
* ``/view-files/<path>``: a file of the file server (debug images, artifacts) for the browser.
  It needs the key and secret, as ``/files`` does, or the signature the pages put in the links
  they show (valid a day): a page's reader can open what the page links to, nothing else.

Charts are Plotly figures drawn by plotly.js: ClearML plots already are Plotly JSON
(``plot_str``), and scalar series become line figures here. Pages are rendered on the server
from the store's documents and events; nothing here writes. Credentials are never rendered
(and the server's key pair is masked should it appear in any stored text: stored values are
masked before they are escaped into a page, never the finished HTML). Every page is sent with a
Content-Security-Policy that keeps scripts, images and connections on the server's own origin
and forbids framing, and has no inline script. A debug image not on the file server is named as
text, never put in an ``<img>``; a Plotly layout image from another address is left out.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from stepwise.clearml_server.fileserver import UnsafePath, safe_file_path
from stepwise.clearml_server.store import Document, Store

WEB_PATH = re.compile(r"^/(?:$|projects(?:/|$)|compare/?$|static/|view-files/)")
LOCAL_ONLY_HOSTS = {"127.0.0.1", "localhost", "::1"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
FIGURES_SCRIPT = (
    'const figures = JSON.parse(document.getElementById("figures").textContent);\n'
    "for (const [id, fig] of Object.entries(figures)) {\n"
    "  Plotly.newPlot(id, fig.data || [], Object.assign({autosize: true}, fig.layout || {}),\n"
    "                 {responsive: true, displaylogo: false});\n"
    "}\n")
CONSOLE_LINES = 5000
HIDDEN = "hidden"
_MASKED: ContextVar[tuple[str, ...]] = ContextVar("masked", default=())  # the strings never shown
_SIGN: ContextVar[Callable[[str], str] | None] = ContextVar("sign", default=None)  # signs /view-files links


def is_web_path(path: str) -> bool:
    """Whether ``path`` (URL-decoded, no query) is one of the results pages."""
    return bool(WEB_PATH.match(path))


def needs_credentials(bound_host: str) -> bool:
    """Pages are open while the server listens on loopback 127.0.0.1 only; elsewhere they ask
    for the server's key and secret (HTTP Basic), as the API does."""
    return bound_host not in LOCAL_ONLY_HOSTS


@dataclass
class Page:
    """An HTTP answer: status, content type, body and extra headers."""

    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # sent from disk instead of ``body`` (a download, plotly.js)


@dataclass
class Site:
    """What the pages read: the store, the file-server folder, and strings never to show."""

    store: Store
    files_dir: Path
    masked: tuple[str, ...] = ()
    sign: Callable[[str], str] | None = None  # a file path -> the query that lets its link open it


def render(site: Site, path: str, query: str = "") -> Page:
    """Answer one GET of a results-page path (see the module docstring)."""
    masked = _MASKED.set(tuple(m for m in site.masked if m))
    sign = _SIGN.set(site.sign)
    try:
        return _render(site, path, query)
    finally:
        _MASKED.reset(masked)
        _SIGN.reset(sign)


def _render(site: Site, path: str, query: str) -> Page:
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    parts = [p for p in path.split("/") if p]
    if path.startswith("/static/"):
        return _static(parts[1:])
    if path.startswith("/view-files/"):
        return _view_file(site, path[len("/view-files"):])
    if not parts or parts == ["projects"]:
        return _html(site, "Projects", _home(site))
    if parts == ["compare"]:  # ?ids=a,b or ?ids=a&ids=b (the compare form)
        return _compare_page(site, [i for v in parse_qs(query).get("ids", []) for i in v.split(",") if i])
    project = parts[1]
    if len(parts) >= 3 and parts[2].startswith("compare-experiments"):
        ids = parts[2].partition(";ids=")[2]
        return _compare_page(site, [i for i in ids.split(",") if i])
    if len(parts) <= 2 or (len(parts) == 3 and parts[2] == "experiments"):
        return _project_page(site, project)
    if parts[2] == "experiments" and len(parts) >= 4:
        return _experiment_page(site, parts[3], "/".join(parts[4:]), params)
    if parts[2] == "models" and len(parts) == 3:
        return _html(site, "Models", _models_table(_models(site.store, None if project == "*" else project)))
    if parts[2] == "models":
        return _model_page(site, parts[3])
    return _not_found(site, f"no page at {path}")


# -- reading the store -------------------------------------------------------------------------
def _projects(store: Store) -> list[Document]:
    return [p for p in store.all("project") if HIDDEN not in (p.get("system_tags") or [])]


def _tasks(store: Store, project: str | None = None) -> list[Document]:
    tasks = [t for t in store.all("task") if project is None or t.get("project") == project]
    return sorted(tasks, key=lambda t: t.get("created") or "", reverse=True)


def _models(store: Store, project: str | None = None, task: str | None = None) -> list[Document]:
    models = [m for m in store.all("model") if (project is None or m.get("project") == project)
              and (task is None or m.get("task") == task)]
    return sorted(models, key=lambda m: m.get("created") or "", reverse=True)


Series = dict[str, dict[str, tuple[list[Any], list[Any]]]]


def scalar_series(store: Store, task_id: str) -> Series:
    """Every scalar a task reported: ``{metric: {variant: (iterations, values)}}`` in report order."""
    series: Series = {}
    for event in store.events(task_id, ["training_stats_scalar"]):
        xs, ys = series.setdefault(str(event.get("metric", "")), {}).setdefault(
            str(event.get("variant", "")), ([], []))
        xs.append(event.get("iter"))
        ys.append(_finite(event.get("value")))
    return series


def metric_summary(series: Series) -> list[tuple[str, str, Any, Any, Any, Any]]:
    """``(metric, variant, last, min, max, last iteration)`` of every scalar series."""
    rows = []
    for metric, variants in series.items():
        for variant, (xs, ys) in variants.items():
            values = [y for y in ys if y is not None]
            rows.append((metric, variant, ys[-1] if ys else None, min(values, default=None),
                         max(values, default=None), xs[-1] if xs else None))
    return rows


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# -- page pieces -------------------------------------------------------------------------------
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7fa}
header{background:#1d2330;color:#fff;padding:.6em 1.2em}header a{color:#fff;margin-right:1.2em}
main{padding:1em 1.4em}a{color:#1859c4;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse;background:#fff;margin:.4em 0 1.2em}
th,td{border:1px solid #d7dbe3;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#eef0f5}
code{font-size:12px}.status{padding:0 .4em;border-radius:3px;background:#e0e4ec}
.status-completed,.status-published{background:#c8ecd0}.status-in_progress{background:#cfe0ff}
.status-failed,.status-stopped{background:#f6d0d0}
nav.tabs a{display:inline-block;padding:.3em .8em;border:1px solid #d7dbe3;border-bottom:none;background:#eef0f5}
nav.tabs a.active{background:#fff;font-weight:600}.panel{background:#fff;border:1px solid #d7dbe3;padding:1em}
.chart{width:100%;max-width:900px;height:380px;margin-bottom:1em}
pre.console{background:#111;color:#ddd;padding:.8em;overflow:auto;max-height:75vh;font-size:12px}
.muted{color:#6b7385}.tag{background:#e6e0f8;border-radius:3px;padding:0 .35em;margin-right:.3em}
img.debug{max-width:320px;border:1px solid #d7dbe3}
"""


def _mask(text: str) -> str:
    """A stored value with the server's key and secret masked (done on values, before escaping)."""
    for secret in _MASKED.get():
        text = text.replace(secret, "[hidden]")
    return text


def _e(value: Any) -> str:
    return html.escape(_mask("" if value is None else str(value)))


def _iteration(value: Any) -> int:
    """A reported iteration as an int (a finite number is truncated; anything else is 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value) if math.isfinite(value) else 0


def _plain(value: Any) -> Any:
    """A figure's JSON values made safe to send: NaN and infinities become null, strings masked."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _mask(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return _e(value)


def _status(status: Any) -> str:
    return f'<span class="status status-{_e(status)}">{_e(status)}</span>'


def _tags(tags: Iterable[str] | None) -> str:
    return "".join(f'<span class="tag">{_e(t)}</span>' for t in tags or [])


def _table(header: list[str], rows: Iterable[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>' if body else '<p class="muted">none</p>'


def _task_url(task: Document, tab: str = "") -> str:
    return f"/projects/{quote(str(task.get('project') or '*'))}/experiments/{quote(str(task['id']))}" + (
        f"/{tab}" if tab else "")


def _model_url(model: Document) -> str:
    return f"/projects/{quote(str(model.get('project') or '*'))}/models/{quote(str(model['id']))}/general"


def _project_name(store: Store, project_id: str | None) -> str:
    project = store.get("project", project_id) if isinstance(project_id, str) and project_id else None
    return project["name"] if project else "(no project)"


def _figure_json(figures: list[tuple[str, dict[str, Any]]]) -> str:
    """Figures as a JSON script body (``<`` escaped so no string can close the script)."""
    return json.dumps(_plain(dict(figures)), allow_nan=False).replace("<", "\\u003c")


def _charts_script(figures: list[tuple[str, dict[str, Any]]]) -> str:
    if not figures:
        return ""
    return (f'<script type="application/json" id="figures">{_figure_json(figures)}</script>'
            '<script src="/static/plotly.min.js"></script><script src="/static/figures.js"></script>')


def _html(site: Site, title: str, body: str, status: int = 200) -> Page:
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)} · stepwise ClearML</title>"
            f"<style>{STYLE}</style></head><body><header><b>stepwise ClearML server</b> &nbsp; "
            f"<a href='/projects'>Projects</a><a href='/projects/*/models'>Models</a></header>"
            f"<main>{body}</main></body></html>")
    return Page(status, "text/html; charset=utf-8", page.encode())


def _not_found(site: Site, message: str) -> Page:
    return _html(site, "Not found", f"<h1>Not found</h1><p>{_e(message)}</p>", status=404)


# -- pages -------------------------------------------------------------------------------------
def _experiments_table(store: Store, tasks: list[Document]) -> str:
    rows = []
    for task in tasks:
        rows.append([f'<input type="checkbox" name="ids" value="{_e(task["id"])}">',
                     f'<a href="{_task_url(task, "info-output/metrics/scalar")}">{_e(task.get("name"))}</a>',
                     f"<code>{_e(task['id'][:8])}</code>", _status(task.get("status")), _e(task.get("type")),
                     _e(_project_name(store, task.get("project"))), _num(task.get("last_iteration")),
                     _e((task.get("last_update") or "")[:19]), _tags(task.get("tags"))])
    table = _table(["", "experiment", "id", "status", "type", "project", "iteration", "updated", "tags"], rows)
    # compare: a plain GET form (ids=a&ids=b), no script (the CSP allows no inline script)
    return (f'<form class="compare" method="get" action="/compare">'
            f'{table}<button type="submit">compare checked experiments</button></form>')


def _models_table(models: list[Document]) -> str:
    rows = [[f'<a href="{_model_url(m)}">{_e(m.get("name"))}</a>', f"<code>{_e(m['id'][:8])}</code>",
             _tags(m.get("tags")), "yes" if m.get("ready") else "no", _e(m.get("framework")),
             _num(m.get("last_iteration")), _e((m.get("created") or "")[:19])] for m in models]
    return _table(["model", "id", "tags", "published", "framework", "iteration", "created"], rows)


def _home(site: Site) -> str:
    store = site.store
    tasks = _tasks(store)
    rows = []
    for project in _projects(store):
        count = sum(1 for t in tasks if t.get("project") == project["id"])
        rows.append([f'<a href="/projects/{quote(project["id"])}">{_e(project["name"])}</a>', str(count),
                     _e((project.get("last_update") or "")[:19])])
    return (f"<h1>Projects</h1>{_table(['project', 'experiments', 'updated'], rows)}"
            f"<h2>Experiments</h2>{_experiments_table(store, tasks[:200])}"
            f"<h2>Models</h2>{_models_table(_models(store)[:200])}")


def _project_page(site: Site, project_id: str) -> Page:
    store = site.store
    if project_id == "*":
        name, tasks, models = "All experiments", _tasks(store), _models(store)
    else:
        project = store.get("project", project_id)
        if project is None:
            return _not_found(site, f"no project with id {project_id}")
        name, tasks, models = project["name"], _tasks(store, project_id), _models(store, project_id)
    body = (f"<p><a href='/projects'>Projects</a> / {_e(name)}</p><h1>{_e(name)}</h1>"
            f"<h2>Experiments</h2>{_experiments_table(store, tasks)}<h2>Models</h2>{_models_table(models)}")
    return _html(site, name, body)


TABS = [("info-output/general", "overview"), ("info-output/metrics/scalar", "scalars"),
        ("info-output/metrics/plots", "plots"), ("info-output/debugImages", "debug images"),
        ("hyper-params/hyper-param", "hyperparameters"), ("execution", "execution"),
        ("artifacts/output-model", "artifacts & models"), ("output/log", "console")]


def _tab_of(sub_path: str) -> str:
    """Which tab a web-app sub-path shows."""
    for prefix, tab in (("output/log", "console"), ("info-output/metrics/scalar", "scalars"),
                        ("info-output/metrics/plot", "plots"), ("info-output/debugImages", "debug images"),
                        ("hyper-params", "hyperparameters"), ("configuration", "hyperparameters"),
                        ("execution", "execution"), ("artifacts", "artifacts & models")):
        if sub_path.startswith(prefix):
            return tab
    return "overview"


def _experiment_page(site: Site, task_id: str, sub_path: str, params: dict[str, str]) -> Page:
    store = site.store
    task = store.get("task", task_id)
    if task is None:
        return _not_found(site, f"no experiment with id {task_id}")
    tab = _tab_of(sub_path)
    nav = "".join(f'<a class="{"active" if name == tab else ""}" href="{_task_url(task, path)}">{name}</a>'
                  for path, name in TABS)
    project = task.get("project") or "*"
    head = (f"<p><a href='/projects'>Projects</a> / <a href='/projects/{quote(project)}'>"
            f"{_e(_project_name(store, task.get('project')))}</a> / {_e(task.get('name'))}</p>"
            f"<h1>{_e(task.get('name'))} {_status(task.get('status'))}</h1>"
            f"<p class='muted'>id <code>{_e(task['id'])}</code> · {_e(task.get('type'))} · iteration "
            f"{_num(task.get('last_iteration'))} · started {_e((task.get('started') or '')[:19])} · updated "
            f"{_e((task.get('last_update') or '')[:19])} {_tags(task.get('tags'))}</p>")
    renderers = {"overview": _overview_tab, "scalars": _scalars_tab, "plots": _plots_tab,
                 "debug images": _debug_images_tab, "hyperparameters": _hyperparams_tab,
                 "execution": _execution_tab, "artifacts & models": _artifacts_tab, "console": _console_tab}
    panel = renderers[tab](site, task, params)
    return _html(site, task.get("name") or task_id, f'{head}<nav class="tabs">{nav}</nav><div class="panel" '
                 f'id="tab-{tab.split()[0]}">{panel}</div>')


def _metrics_table(series: Series) -> str:
    rows = [[_e(metric), _e(variant), _num(last), _num(low), _num(high), _num(it)]
            for metric, variant, last, low, high, it in metric_summary(series)]
    return _table(["metric", "series", "last", "min", "max", "last iteration"], rows, css="metrics")


def _overview_tab(site: Site, task: Document, params: dict[str, str]) -> str:
    models = _models(site.store, task=task["id"])
    comment = f"<p>{_e(task.get('comment'))}</p>" if task.get("comment") else ""
    message = task.get("status_message") or task.get("status_reason")
    return (f"{comment}{f'<p>status: {_e(message)}</p>' if message else ''}"
            f"<h3>Metrics</h3>{_metrics_table(scalar_series(site.store, task['id']))}"
            f"<h3>Models</h3>{_models_table(models)}")


def _scalar_figure(title: str, traces: list[tuple[str, list[Any], list[Any]]]) -> dict[str, Any]:
    many = max((len(xs) for _, xs, _ in traces), default=0) > 60
    return {"data": [{"type": "scatter", "mode": "lines" if many else "lines+markers", "name": name,
                      "x": xs, "y": ys} for name, xs, ys in traces],
            "layout": {"title": {"text": title}, "xaxis": {"title": {"text": "iteration"}},
                       "margin": {"t": 48, "r": 16}, "legend": {"orientation": "h"}}}


def _scalars_tab(site: Site, task: Document, params: dict[str, str]) -> str:
    series = scalar_series(site.store, task["id"])
    figures = [(f"scalar-{i}", _scalar_figure(metric, [(v, xs, ys) for v, (xs, ys) in variants.items()]))
               for i, (metric, variants) in enumerate(series.items())]
    charts = "".join(f'<div class="chart scalar-chart" id="{fid}" data-metric="{_e(metric)}"></div>'
                     for (fid, _), metric in zip(figures, series))
    return (f"{_metrics_table(series)}{charts or '<p class=muted>no scalars reported</p>'}"
            f"{_charts_script(figures)}")


def _plots_tab(site: Site, task: Document, params: dict[str, str]) -> str:
    """One plot title at a time (a training run logs many heatmaps), at one logged iteration."""
    events = site.store.events(task["id"], ["plot"])
    titles = list(dict.fromkeys(str(e.get("metric", "")) for e in events))
    if not titles:
        return "<p class='muted'>no plots reported</p>"
    title = params.get("plot") if params.get("plot") in titles else titles[0]
    of_title = [e for e in events if str(e.get("metric", "")) == title]
    iterations = sorted({_iteration(e.get("iter")) for e in of_title})
    try:
        iteration = int(params["iter"]) if int(params.get("iter", "x")) in iterations else iterations[-1]
    except ValueError:
        iteration = iterations[-1]
    latest: dict[str, Document] = {}  # per series, the last report at that iteration
    for event in of_title:
        if _iteration(event.get("iter")) == iteration:
            latest[str(event.get("variant", ""))] = event
    base = _task_url(task, "info-output/metrics/plots")

    def link(plot: str, it: int | None = None) -> str:
        query = {"plot": plot} | ({"iter": str(it)} if it is not None else {})
        return f"{base}?{urlencode(query)}"

    title_links = " · ".join(f'<a href="{link(t)}">{_e(t)}</a>' if t != title else f"<b>{_e(t)}</b>"
                             for t in titles)
    iter_links = " ".join(f'<a href="{link(title, it)}">{it}</a>' if it != iteration else f"<b>{it}</b>"
                          for it in iterations)
    figures, charts = [], []
    for i, (variant, event) in enumerate(latest.items()):
        try:
            figure = json.loads(event.get("plot_str") or "{}")
        except json.JSONDecodeError:
            continue
        if not isinstance(figure, dict):
            continue
        figure = _local_images(figure)
        figure.setdefault("layout", {})["title"] = {"text": f"{title} · {variant} · iteration {iteration}"}
        figures.append((f"plot-{i}", figure))
        charts.append(f'<div class="chart plot-chart" id="plot-{i}" data-metric="{_e(title)}" '
                      f'data-variant="{_e(variant)}" data-iter="{iteration}"></div>')
    return (f"<p>plots: {title_links}</p><p>logged at iterations: {iter_links} "
            f"(showing iteration <b class='plot-iteration'>{iteration}</b>)</p>{''.join(charts)}"
            f"{_charts_script(figures)}")


def _local_images(figure: dict[str, Any]) -> dict[str, Any]:
    """A Plotly figure without the layout images that would load from another address: only
    ``data:`` images and this server's own paths stay."""
    layout = figure.get("layout")
    if not isinstance(layout, dict) or not isinstance(layout.get("images"), list):
        return figure
    images = [image for image in layout["images"] if isinstance(image, dict)
              and isinstance(image.get("source"), str) and _same_origin(image["source"])]
    return {**figure, "layout": {**layout, "images": images}}


def _same_origin(url: str) -> bool:
    """Whether a URL stays on the page's own origin (a path, or inline ``data:``)."""
    parts = urlsplit(url.strip())
    if parts.scheme == "data":
        return True
    return not parts.scheme and not parts.netloc and url.strip().startswith("/") and not url.strip().startswith("//")


def _file_link(uri: Any) -> str | None:
    """A file-server URI as a signed /view-files link (the page's reader may open it without the
    key and secret), or None for other URIs."""
    if not isinstance(uri, str):
        return None
    path = urlsplit(uri).path
    if not path.startswith("/files/"):
        return None
    link = "/view-files/" + path[len("/files/"):]
    sign = _SIGN.get()
    return f"{link}?{sign(unquote(link[len('/view-files'):]))}" if sign is not None else link


def _debug_images_tab(site: Site, task: Document, params: dict[str, str]) -> str:
    latest: dict[tuple[str, str], Document] = {}
    for event in site.store.events(task["id"], ["training_debug_image"]):
        latest[(str(event.get("metric", "")), str(event.get("variant", "")))] = event
    if not latest:
        return "<p class='muted'>no debug images reported</p>"
    cells = []
    for (metric, variant), event in latest.items():
        src = _file_link(event.get("url"))
        # an image elsewhere is named, not loaded: the reader's browser fetches nothing off this server
        image = (f"<img class='debug' src='{_e(src)}' alt='{_e(metric)} {_e(variant)}'>" if src else
                 f"<p class='muted remote-image'>not shown (not on this server): <code>{_e(event.get('url'))}</code>"
                 "</p>")
        cells.append(f"<figure>{image}<figcaption>{_e(metric)} · {_e(variant)} · iteration "
                     f"{_num(event.get('iter'))}</figcaption></figure>")
    return "".join(cells)


def _hyperparams_tab(site: Site, task: Document, params: dict[str, str]) -> str:
    parts = []
    for section, values in sorted((task.get("hyperparams") or {}).items()):
        rows = [[_e(v.get("name", name)), _e(v.get("value")), _e(v.get("type")), _e(v.get("description"))]
                for name, v in sorted(values.items()) if isinstance(v, dict)]
        parts.append(f"<h3>{_e(section)}</h3>{_table(['name', 'value', 'type', 'description'], rows, 'hparams')}")
    for name, item in sorted((task.get("configuration") or {}).items()):
        parts.append(f"<h3>configuration: {_e(name)}</h3><pre>{_e((item or {}).get('value'))}</pre>")
    return "".join(parts) or "<p class='muted'>no hyperparameters</p>"


def _execution_tab(site: Site, task: Document, params: dict[str, str]) -> str:
    script = task.get("script") or {}
    rows = [[_e(key), _e(script.get(key))] for key in ("repository", "branch", "version_num", "entry_point",
                                                       "working_dir", "binary") if script.get(key)]
    execution = task.get("execution") or {}
    rows += [["queue", _e(execution.get("queue"))], ["last worker", _e(task.get("last_worker"))]]
    container = task.get("container") or {}
    rows += [[f"container {_e(k)}", _e(v)] for k, v in container.items() if v]
    requirements = (script.get("requirements") or {}).get("pip") or ""
    diff = script.get("diff") or ""
    return (f"{_table(['', ''], rows)}<h3>installed packages</h3><pre>{_e(requirements) or 'none recorded'}</pre>"
            f"<h3>uncommitted changes</h3><pre>{_e(diff[:20000]) or 'none'}</pre>")


def _artifacts_tab(site: Site, task: Document, params: dict[str, str]) -> str:
    rows = []
    for artifact in (task.get("execution") or {}).get("artifacts") or []:
        uri = artifact.get("uri")
        link = _file_link(uri)
        rows.append([_e(artifact.get("key")), _e(artifact.get("type")), _e(artifact.get("mode")),
                     f'<a href="{_e(link)}">{_e(uri)}</a>' if link else _e(uri), _num(artifact.get("content_size")),
                     _e(artifact.get("hash"))])
    models = {m["id"]: m for m in _models(site.store, task=task["id"])}
    for entry in (task.get("models") or {}).get("input") or []:
        model = site.store.get("model", entry.get("model") or "")
        if model is not None:
            models.setdefault(model["id"], model)
    return (f"<h3>Artifacts</h3>{_table(['key', 'type', 'mode', 'uri', 'size', 'hash'], rows)}"
            f"<h3>Models</h3>{_models_table(list(models.values()))}")


def _console_tab(site: Site, task: Document, params: dict[str, str]) -> str:
    events = site.store.events(task["id"], ["log"])
    shown = events[-CONSOLE_LINES:]
    note = (f"<p class='muted'>the last {len(shown)} of {len(events)} reports</p>" if len(shown) < len(events)
            else "")
    lines = "\n".join(_e(e.get("msg") or "").rstrip("\n") for e in shown)
    return f"{note}<pre class='console'>{lines or 'no console output reported'}</pre>"


def _model_page(site: Site, model_id: str) -> Page:
    store = site.store
    model = store.get("model", model_id)
    if model is None:
        return _not_found(site, f"no model with id {model_id}")
    task = store.get("task", model.get("task") or "")
    source = f'<a href="{_task_url(task)}/info-output/metrics/scalar">{_e(task.get("name"))}</a> ' \
             f"<code>{_e(task['id'])}</code>" if task else _e(model.get("task"))
    link = _file_link(model.get("uri"))
    rows = [["id", f"<code>{_e(model['id'])}</code>"], ["project", _e(_project_name(store, model.get("project")))],
            ["tags", _tags(model.get("tags"))], ["published", "yes" if model.get("ready") else "no"],
            ["framework", _e(model.get("framework"))], ["iteration", _num(model.get("last_iteration"))],
            ["created", _e(model.get("created"))], ["source experiment", source],
            ["weights", f'<a href="{_e(link)}">{_e(model.get("uri"))}</a>' if link else _e(model.get("uri"))],
            ["comment", _e(model.get("comment"))]]
    metadata = [[_e(key), _e((item or {}).get("value")), _e((item or {}).get("type"))]
                for key, item in sorted((model.get("metadata") or {}).items())]
    body = (f"<p><a href='/projects/*/models'>Models</a> / {_e(model.get('name'))}</p>"
            f"<h1>{_e(model.get('name'))}</h1>{_table(['', ''], rows, 'model')}<h3>Metadata</h3>"
            f"{_table(['key', 'value', 'type'], metadata, 'metadata')}")
    return _html(site, model.get("name") or model_id, body)


def _compare_page(site: Site, ids: list[str]) -> Page:
    store = site.store
    tasks = [t for t in (store.get("task", i) for i in dict.fromkeys(ids)) if t is not None]
    if len(tasks) < 1:
        return _not_found(site, "compare: name experiments with ?ids=ID1,ID2")
    merged: dict[str, list[tuple[str, list[Any], list[Any]]]] = {}
    for task in tasks:
        label = f"{task.get('name')} ({task['id'][:6]})"
        for metric, variants in scalar_series(store, task["id"]).items():
            for variant, (xs, ys) in variants.items():
                merged.setdefault(metric, []).append((f"{label} · {variant}", xs, ys))
    figures = [(f"compare-{i}", _scalar_figure(metric, traces)) for i, (metric, traces) in enumerate(merged.items())]
    charts = "".join(f'<div class="chart scalar-chart" id="{fid}" data-metric="{_e(metric)}"></div>'
                     for (fid, _), metric in zip(figures, merged))
    # hyperparameters side by side: the differing ones first
    names = sorted({(s, n) for t in tasks for s, values in (t.get("hyperparams") or {}).items() for n in values})
    def value(task: Document, section: str, name: str) -> Any:
        return ((task.get("hyperparams") or {}).get(section, {}).get(name) or {}).get("value")
    differing = [(s, n) for s, n in names if len({json.dumps(value(t, s, n)) for t in tasks}) > 1]
    rows = [[_e(f"{s}/{n}")] + [_e(value(t, s, n)) for t in tasks] for s, n in differing]
    header = ["hyperparameter"] + [f'<a href="{_task_url(t, "info-output/metrics/scalar")}">{_e(t.get("name"))}</a>'
                                   f" {_status(t.get('status'))}" for t in tasks]
    body = (f"<h1>Compare {len(tasks)} experiments</h1><h3>Hyperparameters that differ</h3>"
            f"{_table(header, rows, 'compare')}<h3>Scalars</h3>{charts}{_charts_script(figures)}")
    return _html(site, "Compare", body)


# -- files -------------------------------------------------------------------------------------
def _static(parts: list[str]) -> Page:
    if parts == ["figures.js"]:
        return Page(200, "application/javascript", FIGURES_SCRIPT.encode(), {"Cache-Control": "max-age=3600"})
    if parts != ["plotly.min.js"]:
        return Page(404, "text/plain", b"not found")
    import plotly

    script = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return Page(200, "application/javascript", b"", {"Cache-Control": "max-age=86400"}, file=script)


def _view_file(site: Site, path: str) -> Page:
    try:
        target = safe_file_path(site.files_dir, path)
    except UnsafePath as exc:
        return Page(400, "text/plain", str(exc).encode())
    if not target.is_file():
        return Page(404, "text/plain", b"not found")
    images = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
              ".webp": "image/webp"}
    kind = images.get(target.suffix.lower())
    if kind:
        return Page(200, kind, b"", file=target)
    # anything else downloads (never rendered: an uploaded HTML/SVG file must not run as this site)
    return Page(200, "application/octet-stream", b"",
                {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(target.name)}"}, file=target)
