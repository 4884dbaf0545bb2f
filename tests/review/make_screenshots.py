"""Screenshots of the review page for docs/review.md, taken with headless Chromium (Debian's) on a laptop-sized
window over a synthetic queue on local disk; with ``--browser firefox``, the main page once more in Debian's Firefox
ESR (over WebDriver BiDi, tests/review/firefox_bidi.py) as review-page-firefox.png.

    flock /tmp/taxonet-heavy.lock .venv/bin/python -m tests.review.make_screenshots --out docs/img
    flock /tmp/taxonet-heavy.lock .venv/bin/python -m tests.review.make_screenshots --out docs/img --browser firefox
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from taxonet.review import records
from taxonet.review.records import Decision
from tests.review.firefox_bidi import firefox
from tests.review.review_support import chromium, item, log_in, log_in_firefox, serving, write_queue

WAIT_S = 60


def queue() -> list:
    """A morning of unsure crops: an unknown bee three times (look-alikes), hoverflies, a wasp, an audit sample."""
    alike = [(1.0, 0.0, 0.05), (0.97, 0.04, 0.1), (0.96, 0.0, 0.15)]
    crops = [item(f"cam3-0{n}", "Bombus terrestris", "family", source="meadow-cam3", confidence=0.12 + n / 100,
                  embedding=vector, size=192, image_species="Bombus lapidarius",
                  queued_at=f"2026-12-01T06:1{n}:00+00:00") for n, vector in enumerate(alike)]
    crops += [item("cam1-11", "Eristalis tenax", None, source="orchard-cam1", size=192, embedding=(0, 1, 0)),
              item("cam1-12", "Episyrphus balteatus", "order", source="orchard-cam1", size=192, embedding=(0, 0, 1)),
              item("cam1-13", "Eupeodes corollae", "order", source="orchard-cam1", size=192, embedding=(0, .7, .7)),
              item("cam2-21", "Vespula vulgaris", "order", source="meadow-cam2", size=192, embedding=(.5, .5, 0)),
              item("cam2-22", "Aglais urticae", "family", source="meadow-cam2", size=192, embedding=(.2, .1, .9)),
              item("cam2-23", "Apis mellifera", "species", reason="audit", source="meadow-cam2", size=192),
              item("cam1-14", "Eristalis tenax", None, source="orchard-cam1", size=192,
                   image_species="Eupeodes corollae", embedding=(0, .9, .3),
                   alternatives=("Hymenoptera", "Apidae", "Eupeodes corollae", "Episyrphus balteatus")),
              item("cam4-31", "Coccinella septempunctata", "order", source="hedge-cam4", size=192,
                   embedding=(.3, 0, 1)),
              item("cam4-32", "Aglais urticae", "order", source="hedge-cam4", size=192, embedding=(1, 1, 0)),
              item("cam4-33", "Episyrphus balteatus", "family", source="hedge-cam4", size=192, embedding=(0, .2, 1))]
    return crops


def decisions() -> list[Decision]:
    at = "2026-12-01T08:{}+00:00".format
    return [Decision("cam2-23", "ana", "taxon", rank="species", taxon="Apis mellifera", decided_at=at("00:10")),
            Decision("cam2-22", "ana", "taxon", rank="species", taxon="Aglais urticae", decided_at=at("00:40")),
            Decision("cam1-13", "ana", "taxon", rank="family", taxon="Syrphidae", decided_at=at("01:30")),
            Decision("cam1-12", "ana", "taxon", rank="species", taxon="Eupeodes corollae", decided_at=at("02:10")),
            Decision("cam1-11", "ben", "new_species", rank="family", parent="Apidae", decided_at=at("02:20")),
            Decision("cam2-21", "ben", "taxon", rank="family", taxon="Vespidae", decided_at=at("02:45")),
            Decision("cam1-13", "ben", "taxon", rank="species", taxon="Episyrphus balteatus",
                     decided_at=at("03:00"))]


def firefox_page(url: str, out: Path) -> list[Path]:
    """The first screenshot (a type-ahead search under way) in Firefox."""
    path = out / "review-page-firefox.png"
    with firefox(1366, 800) as browser:
        log_in_firefox(browser, url, "cara", wait_s=WAIT_S)
        browser.wait_for("document.getElementById('crop-meta').textContent.includes('cam1-14')",
                         "the first crop never showed", WAIT_S)
        browser.click("#search")
        browser.keys("syrph")
        browser.wait_for("document.querySelectorAll('#results li').length", "no search results", WAIT_S)
        browser.wait_for("[...document.images].every((image) => image.complete)", "images never loaded", WAIT_S)
        time.sleep(0.5)  # images finish drawing
        browser.screenshot(path)
    return [path]


def chromium_pages(url: str, out: Path) -> list[Path]:
    """The page, a look-alike group about to be named, and the statistics, in Chromium."""
    with chromium(1366, 800) as driver:
        log_in(driver, url, "cara")
        wait = WebDriverWait(driver, WAIT_S)
        wait.until(lambda d: "cam1-14" in d.find_element(By.ID, "crop-meta").text)
        driver.find_element(By.ID, "search").send_keys("syrph")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results li"))
        time.sleep(0.5)  # images finish drawing
        driver.save_screenshot(str(out / "review-page.png"))
        driver.find_element(By.ID, "search").send_keys(Keys.ESCAPE)  # clears the search, leaves the box
        driver.find_element(By.CSS_SELECTOR, '#list .thumb[data-crop="cam3-00"]').click()
        ActionChains(driver).send_keys("g").perform()
        wait.until(lambda d: "look-alikes selected" in d.find_element(By.ID, "status").text)
        ActionChains(driver).send_keys("n").perform()
        driver.find_element(By.ID, "ns-name").send_keys("Apidae sp. A")
        time.sleep(0.5)
        driver.save_screenshot(str(out / "review-group.png"))
        driver.find_element(By.ID, "tab-stats").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#stats-ranks tbody tr"))
        time.sleep(0.3)
        driver.save_screenshot(str(out / "review-stats.png"))
    return [out / name for name in ("review-page.png", "review-group.png", "review-stats.png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/img", help="where the PNGs go (default: docs/img)")
    parser.add_argument("--browser", choices=("chromium", "firefox"), default="chromium",
                        help="chromium: the three screenshots; firefox: review-page-firefox.png (default: chromium)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as root:
        write_queue(f"{root}/queue", queue())
        for decision in decisions():
            records.write_decision(f"{root}/labels", decision)
        with serving(f"{root}/queue", f"{root}/labels") as url:
            paths = firefox_page(url, out) if args.browser == "firefox" else chromium_pages(url, out)
    print("\n".join(map(str, paths)))


if __name__ == "__main__":
    main()
