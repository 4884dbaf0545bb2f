"""The review page in a real browser (Debian's Chromium + chromedriver, driven by Selenium): log in, review
three crops — one by mouse to a species, one by keyboard to "new species in Apidae", one accepted and undone — and
find the decisions on S3 (moto's server). Run under the shared lock: flock /tmp/taxonet-heavy.lock ..."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tests.review.review_support import assert_three_crops_reviewed, chromium, item, log_in, serving, write_queue

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]
WAIT_S = 90


def _text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def _wait_text(driver, element_id: str, fragment: str) -> None:
    WebDriverWait(driver, WAIT_S).until(lambda d: fragment in _text(d, element_id),
                                        message=f"#{element_id} never showed {fragment!r}")


def test_review_three_crops_by_mouse_keyboard_and_undo(s3_bucket: str) -> None:
    queue, labels = f"s3://{s3_bucket}/review/queue", f"s3://{s3_bucket}/review/labels"
    # shown in this order: no reliable rank first, then reliable to order, then to family
    write_queue(queue, [item("crop-a", "Bombus terrestris", None, image_species="Apis mellifera"),
                        item("crop-b", "Apis mellifera", "order"),
                        item("crop-c", "Vespula vulgaris", "family")])
    with serving(queue, labels) as url, chromium() as driver:
        log_in(driver, url, "ana")
        _wait_text(driver, "crop-meta", "crop-a")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#list .thumb")) == 3
        assert "Bombus terrestris" in _text(driver, "answer")  # the model's answer per rank, with scores

        # 1. by mouse: type-ahead, click the species
        driver.find_element(By.ID, "search").click()
        driver.find_element(By.ID, "search").send_keys("mellif")
        choice = WebDriverWait(driver, WAIT_S).until(
            lambda d: d.find_element(By.CSS_SELECTOR, '#results li[data-name="Apis mellifera"]'))
        choice.click()
        _wait_text(driver, "status", "Apis mellifera (species)")
        _wait_text(driver, "crop-meta", "crop-b")

        # 2. by keyboard: N opens "new species in <family>", typed over, Enter saves
        ActionChains(driver).send_keys("n").perform()
        WebDriverWait(driver, WAIT_S).until(lambda d: d.switch_to.active_element.get_attribute("id") == "ns-parent")
        ActionChains(driver).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys(
            "apidae", Keys.ENTER).perform()
        _wait_text(driver, "status", "new species in Apidae")
        _wait_text(driver, "crop-meta", "crop-c")

        # 3. accept the model's answer with A, then undo it with U
        ActionChains(driver).send_keys("a").perform()
        _wait_text(driver, "status", "Vespula vulgaris (species)")
        WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "empty").is_displayed(),
                                            message="the queue never ran out")
        ActionChains(driver).send_keys("u").perform()
        _wait_text(driver, "status", "undone")
        _wait_text(driver, "crop-meta", "crop-c")  # the undone crop is back on the page

        severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert severe == [], severe

    assert_three_crops_reviewed(labels)
