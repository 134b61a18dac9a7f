"""The results pages under their Content-Security-Policy, in headless Chromium (issue 21, row 11).

The policy keeps a page on the server's own origin: the pages must still work under it (charts
drawn, the compare form submitting without inline script) and load nothing from elsewhere, even
when a stored debug image or Plotly layout image names another address.
"""

from __future__ import annotations

import json

import pytest
import requests

from support.clearml_api import call, login
from support.processes import ClearMLServerProcess

pytestmark = pytest.mark.browser


def test_pages_work_under_their_policy_and_load_nothing_from_elsewhere(clearml_server: ClearMLServerProcess,
                                                                       browser: object) -> None:
    url = clearml_server.url
    auth = login(url)
    ids = []
    for name in ("first run", "second run"):
        created = call(url, auth, "tasks.create", {"name": name, "type": "training"})
        ids.append(created.json()["data"]["id"])
    figure = {"data": [{"type": "heatmap", "z": [[1, 2], [3, 4]]}],
              "layout": {"images": [{"source": "https://evil.example/layout.png", "xref": "paper", "yref": "paper",
                                     "x": 0, "y": 1, "sizex": 1, "sizey": 1}]}}
    events = [{"type": "training_stats_scalar", "task": task_id, "metric": "loss", "variant": "train",
               "value": 1.0 / (i + 1), "iter": i} for task_id in ids for i in range(3)]
    events += [{"type": "training_debug_image", "task": ids[0], "metric": "sample", "variant": "remote", "iter": 1,
                "url": "https://evil.example/track.png"},
               {"type": "plot", "task": ids[0], "metric": "attention", "variant": "v", "iter": 1,
                "plot_str": json.dumps(figure)}]
    added = requests.post(f"{url}/v2.23/events.add_batch", data="\n".join(json.dumps(e) for e in events),
                          headers=auth, timeout=10)
    assert added.status_code == 200, added.text

    page = browser.new_page()
    requested: list[str] = []
    refused: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("console", lambda message: refused.append(message.text)
            if "Content Security Policy" in message.text else None)
    # the compare form: two experiments checked on the home page, submitted without any script of its own
    page.goto(f"{url}/")
    for task_id in ids:
        page.check(f'form.compare input[value="{task_id}"]')
    page.click("form.compare button")
    page.wait_for_url("**/compare?**")
    assert "Compare 2 experiments" in page.locator("h1").text_content()
    page.wait_for_selector(".scalar-chart .main-svg")
    assert len(page.evaluate("document.querySelector('.scalar-chart').data")) == 2  # both runs' curves
    # the plots and debug images of the run with remote images
    base = f"{url}/projects/*/experiments/{ids[0]}"
    page.goto(f"{base}/info-output/metrics/plots")
    page.wait_for_selector(".plot-chart .main-svg")
    page.goto(f"{base}/info-output/debugImages")
    assert "evil.example/track.png" in page.locator(".remote-image").text_content()
    page.close()
    assert refused == [], refused
    assert requested and all(address.startswith(url) for address in requested), [
        address for address in requested if not address.startswith(url)]
