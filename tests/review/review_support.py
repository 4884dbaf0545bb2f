"""Helpers of the review tests and the screenshot script: a queue of synthetic crops with model answers, and the
review app served over real HTTP (uvicorn in a thread) on 127.0.0.1."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import requests
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from taxonet.data.synthetic import SyntheticInsects
from taxonet.review import records
from taxonet.review.app import build_app
from taxonet.review.leases import Leases
from taxonet.review.records import QueueItem
from taxonet.review.store import ReviewStore
from taxonet.taxonomy import Taxonomy
from tests.net_support import free_port
from tests.review.firefox_bidi import Firefox

TAXONOMY = Taxonomy.demo()
TOKEN = "review-test-token"


def answer(chain: Sequence[str], reliable_to: str | None, confidence: float = 0.3,
           alternatives: Sequence[str] = ()) -> dict:
    """A model answer (the predictor's JSON) whose winners are ``chain``, reliable down to ``reliable_to``."""
    level = TAXONOMY.ranks.index(reliable_to) if reliable_to else -1
    ranks = {}
    for depth, (rank, label) in enumerate(zip(TAXONOMY.ranks, chain)):
        top = [{"label": label, "probability": 0.61}] + [{"label": other, "probability": 0.2}
                                                          for other in alternatives if other in TAXONOMY.names[depth]]
        ranks[rank] = {"top_k": top, "label": label, "score": 4.0 - depth, "reliable": depth <= level,
                       "confidence": confidence if depth > level else 0.9}
    return {"ranks": ranks, "lowest_reliable_rank": reliable_to,
            "lowest_reliable_label": chain[level] if level >= 0 else None, "consistent": True}


def chain_of(species: str) -> tuple[str, ...]:
    return tuple(TAXONOMY.chain_names("species", TAXONOMY.index("species", species)))


def jpeg(chain: Sequence[str], index: int = 0, size: int = 64) -> bytes:
    image = SyntheticInsects(TAXONOMY, image_size=size, seed=3).render(chain, index)
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def item(crop_id: str, species: str, reliable_to: str | None, *, source: str | None = None, reason: str = "unsure",
         embedding: Sequence[float] = (), confidence: float = 0.3, size: int = 64, image_species: str | None = None,
         queued_at: str = "2026-12-01T09:00:00+00:00", alternatives: Sequence[str] = ()) -> QueueItem:
    chain = chain_of(species)
    data = jpeg(chain_of(image_species or species), index=sum(map(ord, crop_id)), size=size)
    return QueueItem(crop_id=crop_id, reason=reason, jpeg=data, width=size, height=size,
                     answer=json.dumps(answer(chain, reliable_to, confidence, alternatives)), model="demo",
                     model_version="3", lowest_reliable_rank=reliable_to, source=source, queued_at=queued_at,
                     embedding=tuple(embedding))


@contextmanager
def serving(queue: str, labels: str, *, tokens: Sequence[str] = (TOKEN,), leases: Leases | None = None,
            refresh_s: float = 0.0) -> Iterator[str]:
    """The review app on a free loopback port; yields its base URL."""
    store = ReviewStore(queue, labels, TAXONOMY, refresh_s=refresh_s)
    app = build_app(store, leases or Leases(), tokens)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the review app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def session(reviewer: str, token: str = TOKEN) -> requests.Session:
    client = requests.Session()
    client.headers.update({"Authorization": f"Bearer {token}", "X-Reviewer": reviewer})
    return client


def write_queue(queue: str, items: Sequence[QueueItem], batch_id: str = "20261201T090000000000-test") -> None:
    records.write_queue_batch(queue, items, batch_id=batch_id)


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def chromium(width: int = 1366, height: int = 768) -> Iterator[webdriver.Chrome]:
    """Debian's headless Chromium through its own chromedriver (Selenium Manager is never asked to download)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def log_in(driver: webdriver.Chrome, url: str, name: str, token: str = TOKEN) -> None:
    driver.get(url + "/")
    WebDriverWait(driver, 60).until(ec.visibility_of_element_located((By.ID, "login-name"))).send_keys(name)
    driver.find_element(By.ID, "login-token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    WebDriverWait(driver, 60).until(ec.visibility_of_element_located((By.ID, "review")))


def log_in_firefox(browser: Firefox, url: str, name: str, token: str = TOKEN, wait_s: float = 90) -> None:
    """The login of ``log_in`` in Firefox (tests/review/firefox_bidi.py): real clicks and key presses."""
    browser.navigate(url + "/")
    browser.wait_for("!document.getElementById('login').hidden", "the login form never showed", wait_s)
    browser.click("#login-name")
    browser.keys(name)
    browser.click("#login-token")
    browser.keys(token, "Enter")
    browser.wait_for("!document.getElementById('review').hidden", "the review page never showed", wait_s)


def assert_three_crops_reviewed(labels: str) -> None:
    """The label records the browser tests' story leaves on ``labels``: crop-a named by mouse to a species, crop-b
    by keyboard as a new species in Apidae, crop-c accepted and undone (a retract record, the history kept)."""
    decisions = records.read_decisions(labels)
    said = [(d.crop_id, d.reviewer, d.kind, d.rank, d.taxon, d.parent) for d in decisions]
    assert said == [("crop-a", "ana", "taxon", "species", "Apis mellifera", None),
                    ("crop-b", "ana", "new_species", "family", None, "Apidae"),
                    ("crop-c", "ana", "taxon", "species", "Vespula vulgaris", None),
                    ("crop-c", "ana", "retract", None, None, None)]
    assert set(records.current_labels(decisions)) == {"crop-a", "crop-b"}
