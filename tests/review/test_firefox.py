"""The review page in Firefox (Debian's firefox-esr, driven over WebDriver BiDi by tests/review/firefox_bidi.py; no
geckodriver, nothing downloaded): the Chromium test's story with real mouse and keyboard input — log in, review
three crops (by mouse to a species, by keyboard to "new species in Apidae", one accepted and undone by keyboard),
find the decisions on S3 (moto's server), and no JavaScript error on the page. Run under the shared lock:
flock /tmp/taxonet-heavy.lock ..."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.review.firefox_bidi import FIREFOX, Firefox, firefox
from tests.review.review_support import assert_three_crops_reviewed, item, log_in_firefox, serving, write_queue

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(shutil.which(FIREFOX) is None,
                                 reason=f"{FIREFOX} is not installed (make system-deps installs Debian's firefox-esr)")]
WAIT_S = 90


def _wait_text(browser: Firefox, element_id: str, fragment: str) -> None:
    selector, text = json.dumps(f"#{element_id}"), json.dumps(fragment)
    browser.wait_for(f"(document.querySelector({selector})?.textContent ?? '').includes({text})",
                     f"#{element_id} never showed {fragment!r} (it shows {browser.text(f'#{element_id}')!r})", WAIT_S)


def _active_id(browser: Firefox) -> object:
    return browser.evaluate("document.activeElement?.id ?? ''")


def test_review_three_crops_in_firefox(s3_bucket: str) -> None:
    queue, labels = f"s3://{s3_bucket}/review/queue", f"s3://{s3_bucket}/review/labels"
    # shown in this order: no reliable rank first, then reliable to order, then to family
    write_queue(queue, [item("crop-a", "Bombus terrestris", None, image_species="Apis mellifera"),
                        item("crop-b", "Apis mellifera", "order"),
                        item("crop-c", "Vespula vulgaris", "family")])
    with serving(queue, labels) as url, firefox(1366, 768) as browser:
        assert "Firefox/" in str(browser.evaluate("navigator.userAgent"))

        log_in_firefox(browser, url, "ana")  # typed into the form, sent with Enter
        _wait_text(browser, "crop-meta", "crop-a")
        assert browser.evaluate("document.querySelectorAll('#list .thumb').length") == 3
        assert "Bombus terrestris" in browser.text("#answer")  # the model's answer per rank, with scores
        assert browser.wait_for("document.getElementById('crop-image').naturalWidth", "the crop never loaded") == 64

        # 1. by mouse: type-ahead, then a real click on the species in the results
        browser.click("#search")
        assert _active_id(browser) == "search"
        browser.keys("mellif")
        choice = '#results li[data-name="Apis mellifera"]'
        browser.wait_for(f"document.querySelector({json.dumps(choice)})", "the type-ahead never offered it", WAIT_S)
        browser.click(choice)
        _wait_text(browser, "status", "Apis mellifera (species)")
        _wait_text(browser, "crop-meta", "crop-b")

        # 2. by keyboard: N opens "new species in <family>", typed over, Enter saves
        browser.keys("n")
        browser.wait_for("document.activeElement?.id === 'ns-parent'", "N never focused the new-species form",
                         WAIT_S)
        browser.keys(("Control", "a"), "apidae", "Enter")
        _wait_text(browser, "status", "new species in Apidae")
        _wait_text(browser, "crop-meta", "crop-c")

        # 3. accept the model's answer with A, then undo it with U
        browser.keys("a")
        _wait_text(browser, "status", "Vespula vulgaris (species)")
        browser.wait_for("!document.getElementById('empty').hidden", "the queue never ran out", WAIT_S)
        browser.keys("u")
        _wait_text(browser, "status", "undone")
        _wait_text(browser, "crop-meta", "crop-c")  # the undone crop is back on the page

        errors = browser.errors()
        assert errors == [], [(entry.get("type"), entry.get("text")) for entry in errors]

    assert_three_crops_reviewed(labels)
