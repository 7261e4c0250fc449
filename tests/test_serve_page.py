"""The page at ``/`` in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
pick an image, type a phrase, submit; the overlay is drawn with the served mask. The screenshot is kept
under the test's tmp_path (pytest keeps the last runs' dirs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests
from test_predictor import tiny_checkpoint
from test_serve import post_form, rle_mask, start_service, stop_service

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (`apt-get install -y chromium chromium-driver`;"
           " .ci/run installs them)")


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory) -> str:
    base = start_service(tiny_checkpoint(tmp_path_factory))
    yield base
    stop_service()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def canvas_stats(driver, canvas_id: str) -> dict:
    """{"w", "h", "opaque": pixels with alpha > 0, "changed": pixels that differ from the picked image
    drawn alone (the page's ``imageBitmap``)}."""
    return driver.execute_script("""
        const c = document.getElementById(arguments[0]);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const plain = document.createElement('canvas');
        plain.width = c.width; plain.height = c.height;
        plain.getContext('2d').drawImage(imageBitmap, 0, 0, c.width, c.height);
        const p = plain.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let opaque = 0, changed = 0;
        for (let i = 0; i < d.length; i += 4) {
            if (d[i + 3] > 0) opaque++;
            if (d[i] !== p[i] || d[i + 1] !== p[i + 1] || d[i + 2] !== p[i + 2]) changed++;
        }
        return {w: c.width, h: c.height, opaque: opaque, changed: changed};
    """, canvas_id)


def test_page_draws_the_served_mask(url, browser, synthetic_root, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from refseg.data import load_split

    sample = load_split(synthetic_root, "refcoco", "unc", "val")[0]
    image = Path(sample["image_path"])
    served = post_form(url, image.read_bytes(), sample["sentence"]).json()
    area = int(rle_mask(served).sum())
    assert area > 0

    browser.get(url)
    assert "refseg" in browser.title
    WebDriverWait(browser, 30).until(lambda d: "checkpoint" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(image))
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "status"), image.name))
    browser.find_element(By.ID, "text").send_keys(sample["sentence"])
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("done"), status

    w, h = served["width"], served["height"]
    overlay = canvas_stats(browser, "overlay")
    assert (overlay["w"], overlay["h"]) == (w, h) and overlay["opaque"] == w * h
    assert browser.execute_script("return document.body.dataset.maskArea") == str(area)
    assert 0.9 * area <= overlay["changed"] <= area  # the tinted pixels are the mask's
    heat = canvas_stats(browser, "heatmap")
    assert heat["opaque"] == w * h and heat["changed"] > 0.5 * w * h
    link = browser.find_element(By.ID, "download")
    assert link.is_displayed() and link.get_attribute("href").startswith("blob:")
    shot = tmp_path / "serve_page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    print(f"screenshot: {shot}")
    assert requests.get(url + "app.js", timeout=30).headers["content-type"].startswith("text/javascript")
