"""`hdkd serve`: predictions with their Grad-CAM overlay, bad uploads answered per file, the model card's sections
(escaped), start-up errors, and the loopback default. The page in a real browser: tests/browser/."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import uvicorn
from PIL import Image
from starlette.testclient import TestClient

from hdkd.report.model_card import model_card
from hdkd.use.cli import main
from hdkd.use.inference import Classifier, load_classifier, read_image, to_batch
from hdkd.use.serve import CARD_SECTIONS, MAX_PIXELS, card_sections, create_app
from tests.helpers.browser import CLASSES, SIZE, bomb_png, lesion_png, save_tiny_model

CARD = """# Model card: HDKD

## Model details

- Secret <b>details</b> not shown.

## Intended use

- Research on `distillation` <script>alert(1)</script>.

## Must not be used for

- Diagnosis: it is *not* a medical device.

## Provenance

- Git commit: abc.
"""


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def client(model_file, tmp_path_factory):
    card = tmp_path_factory.mktemp("card") / "model_card.md"
    card.write_text(CARD)
    with TestClient(create_app(model_file, card, max_mb=1)) as c:
        yield c


def upload(client, *files: tuple[str, bytes]):
    return client.post("/predict", files=[("files", (name, data, "image/png")) for name, data in files])


def png_size(data_url: str) -> tuple[int, int]:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).size


def test_predict_gives_sorted_probabilities_the_top_class_and_the_overlay(client, model_file, tmp_path):
    (tmp_path / "lesion.png").write_bytes(lesion_png())
    expected = load_classifier(model_file).predict_proba(to_batch([read_image(tmp_path / "lesion.png", SIZE)]))[0]
    response = upload(client, ("lesion.png", lesion_png()))
    assert response.status_code == 200
    (result,) = response.json()["results"]
    probs = [p["probability"] for p in result["probabilities"]]
    assert sorted(p["class"] for p in result["probabilities"]) == sorted(CLASSES)
    assert sum(probs) == pytest.approx(1.0) and probs == sorted(probs, reverse=True)
    assert result["predicted"] == result["probabilities"][0]["class"] == CLASSES[int(np.argmax(expected))]
    assert result["probability"] == pytest.approx(expected.max())
    assert png_size(result["input"]) == (SIZE, SIZE)  # the image as the network sees it
    assert min(png_size(result["overlay"])) > 100 and result["note"] is None


def test_bad_uploads_get_a_clear_message_each_and_the_server_goes_on(client):
    good = lesion_png()
    response = upload(client, ("notes.png", b"not an image\n"), ("empty.png", b""), ("a.png", good),
                      ("truncated.png", good[:80]), ("bomb.png", bomb_png(8000, 8000)),
                      ("huge.png", bomb_png(40000, 40000)))  # over 2x Pillow's own limit: Pillow refuses it itself
    assert response.status_code == 200
    results = {r["name"]: r for r in response.json()["results"]}
    assert list(results) == ["notes.png", "empty.png", "a.png", "truncated.png", "bomb.png", "huge.png"]
    assert results["notes.png"]["error"].startswith("not an image")
    assert results["empty.png"]["error"].startswith("not an image")
    assert "predicted" in results["a.png"] and "error" not in results["a.png"]  # the others' errors left it alone
    assert results["truncated.png"]["error"].startswith("cannot decode this image") and "truncated" in results[
        "truncated.png"]["error"]
    assert "decompression bomb: 8000 x 8000 pixels" in results["bomb.png"]["error"]
    assert f"{MAX_PIXELS:,}" in results["bomb.png"]["error"]
    assert "decompression bomb" in results["huge.png"]["error"]

    big = b"\0" * (2**20 + 1)  # max_mb=1
    response = upload(client, ("big.png", big))  # Content-Length announces it
    assert response.status_code == 413 and response.json()["detail"].startswith("too large")
    body = b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n\r\n" + big + b"\r\n--B--\r\n"
    response = client.post("/predict", content=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                           headers={"Content-Type": "multipart/form-data; boundary=B"})  # chunked: counted
    assert response.status_code == 413 and response.json()["detail"].startswith("too large")

    assert client.get("/health").json()["status"] == "ok"
    assert upload(client, ("again.png", good)).json()["results"][0]["predicted"] in CLASSES


def test_page_shows_the_cards_intended_use_and_limits_escaped(client):
    page = client.get("/").text
    assert '<input type="file" id="files" name="files" accept="image/*" multiple>' in page
    assert "<h3>Intended use</h3>" in page and "<h3>Must not be used for</h3>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "<code>distillation</code>" in page and "<em>not</em>" in page
    assert "Secret" not in page and "Git commit" not in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere: works offline


def test_the_generated_card_has_the_sections_the_page_shows(bundle):
    headings = [h for h, lines in card_sections(model_card(bundle, [])) if lines]
    assert headings[:2] == list(CARD_SECTIONS[:2])


class NoLayers(Classifier):
    """A classifier without a PyTorch network (as an ONNX export): probabilities, no Grad-CAM."""

    classes, image_size, source = tuple(CLASSES), SIZE, "model.onnx"

    def predict_proba(self, images):
        return np.tile([0.2, 0.5, 0.3], (len(images), 1))


def test_a_model_without_layers_gets_probabilities_and_a_note_instead_of_the_overlay():
    with TestClient(create_app(NoLayers())) as c:
        (result,) = upload(c, ("a.png", lesion_png())).json()["results"]
    assert result["predicted"] == "malignant" and result["overlay"] is None
    assert "No Grad-CAM overlay" in result["note"] and "model.pt" in result["note"]
    assert "No model card" in c.get("/").text


def test_serve_listens_on_loopback_by_default_and_warns_otherwise(model_file, monkeypatch, capsys):
    configs = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: configs.append(self.config))
    assert main(["serve", "--model", str(model_file), "--card", str(model_file.with_name("none.md"))]) == 1
    assert capsys.readouterr().err.strip().endswith("no model card " + str(model_file.with_name("none.md")))
    assert main(["serve", "--model", str(model_file), "--device", "cpu"]) == 0
    assert (configs[-1].host, configs[-1].port) == ("127.0.0.1", 8000)
    assert "warning" not in capsys.readouterr().err
    assert main(["serve", "--model", str(model_file), "--device", "cpu", "--host", "0.0.0.0", "--port", "9"]) == 0
    assert (configs[-1].host, configs[-1].port) == ("0.0.0.0", 9)
    assert "anyone who can reach this machine" in capsys.readouterr().err


def test_a_model_that_cannot_be_loaded_stops_the_command_with_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing.pt")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("hdkd serve: error:") and "missing.pt" in line
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["serve", "--model", str(tmp_path / "junk.pt")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("hdkd serve: error:") and "junk.pt" in line
