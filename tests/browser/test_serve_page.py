"""The page of `hdkd serve` in a real headless browser (Debian's Chromium under Selenium): images uploaded through
the file input get their top class and Grad-CAM overlay; a file that is not an image and a decompression bomb get
their errors, and the page goes on working. A screenshot of the page with a prediction is saved to $HDKD_SCREENSHOT (default: tmp_path)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hdkd.use.inference import load_classifier, read_image, to_batch
from hdkd.use.serve import create_app
from tests.helpers import ROOT
from tests.helpers.browser import bomb_png, chromium, lesion_png, save_tiny_model, serving

WAIT_S = 60


def test_the_page_predicts_uploads_and_shows_errors(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = save_tiny_model(tmp_path / "model.pt")
    images = {"lesion.png": lesion_png(seed=0), "notes.png": b"not an image, renamed .png\n",
              "bomb.png": bomb_png(8000, 8000), "second.png": lesion_png(seed=1)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    classifier = load_classifier(model)
    expected = classifier.classes[int(np.argmax(classifier.predict_proba(
        to_batch([read_image(tmp_path / "lesion.png", classifier.image_size)]))[0]))]
    card = ROOT / "reports" / "model_card.md"
    app = create_app(classifier, card if card.is_file() else None)

    with serving(app) as url, chromium(tmp_path / "profile") as driver:
        driver.get(url)
        assert driver.title == "hdkd: try a model"
        file_input = driver.find_element(By.CSS_SELECTOR, "input[type=file]")

        def wait_for(name: str, state: str):
            css = f".result[data-state={state}]"
            WebDriverWait(driver, WAIT_S).until(
                lambda d: any(e.find_element(By.TAG_NAME, "h3").text == name for e in d.find_elements(By.CSS_SELECTOR, css)))
            return next(e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.find_element(By.TAG_NAME, "h3").text == name)

        # a good image, a text file renamed .png and a decompression bomb, picked together
        file_input.send_keys("\n".join(str(tmp_path / name) for name in ("lesion.png", "notes.png", "bomb.png")))
        done = wait_for("lesion.png", "done")
        assert done.find_element(By.CSS_SELECTOR, ".top-class").text == expected
        overlay = done.find_element(By.CSS_SELECTOR, "img.overlay")
        WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", overlay) > 0)
        assert len(done.find_elements(By.CSS_SELECTOR, "table tr")) == len(classifier.classes)
        error = wait_for("notes.png", "error").find_element(By.CSS_SELECTOR, ".error").text
        assert error.startswith("Error: not an image")
        assert "decompression bomb" in wait_for("bomb.png", "error").find_element(By.CSS_SELECTOR, ".error").text

        # the page goes on working after the error
        file_input.send_keys(str(tmp_path / "second.png"))
        assert wait_for("second.png", "done").find_element(By.CSS_SELECTOR, ".top-class").text in classifier.classes
        if card.is_file():
            assert "Intended use" in driver.find_element(By.ID, "card").text
        screenshot = Path(os.environ.get("HDKD_SCREENSHOT") or tmp_path / "serve_page.png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.save_screenshot(str(screenshot))
