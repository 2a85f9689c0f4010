"""The web page in a real browser (headless Debian Chromium driven by chromedriver): generate, watch, cancel."""

import io
import shutil

import pytest
from serving import require_serve_extra

require_serve_extra()

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# Headless and quiet: the machine has no network, and the browser must not try to reach one.
FLAGS = ("--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-quic", "--disable-gpu", "--disable-dev-shm-usage",
         "--window-size=1200,900")  # fmt: skip

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver "
                                "(Debian: apt-get install chromium chromium-driver)")  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def fill(driver, **values):
    for element_id, value in values.items():
        element = driver.find_element(By.ID, element_id.replace("_", "-"))
        element.clear()
        element.send_keys(str(value))


def test_page_generates_an_image_with_live_progress(browser, server):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sampler option"))  # capabilities loaded
    assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")] == ["tiny-a (sd1)",
                                                                                        "tiny-b (sd1)"]  # fmt: skip
    fill(browser, prompt="a lighthouse at dusk", negative_prompt="fog", width=64, height=64, steps=60, seed=5)
    browser.find_element(By.ID, "generate").click()
    # While it runs: the progress bar moves and the preview shows the latents.
    wait.until(lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/png"))
    assert float(browser.find_element(By.ID, "progress").get_attribute("value")) > 0
    assert "step" in browser.find_element(By.ID, "status").text
    card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card"))[0]
    image = card.find_element(By.TAG_NAME, "img")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 64
    parameters = card.find_element(By.TAG_NAME, "pre").text
    assert parameters.startswith("a lighthouse at dusk\nNegative prompt: fog\nSteps: 60,") and "Seed: 5," in parameters
    assert browser.find_element(By.ID, "message").text.startswith("done")


def test_page_cancels_a_running_generation(browser, server):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sampler option"))
    fill(browser, prompt="never finished", width=64, height=64, steps=2000)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/png"))
    browser.find_element(By.ID, "cancel").click()
    wait.until(lambda d: d.find_element(By.ID, "message").text == "cancelled")
    assert browser.find_element(By.ID, "generate").is_enabled()
    assert browser.find_elements(By.CSS_SELECTOR, "#gallery .card") == []
    assert server.get("/health").json()["worker"] == "idle"


def test_page_reports_errors(browser, server):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sampler option"))
    fill(browser, prompt="too big", width=1024, height=64, steps=2)
    browser.find_element(By.ID, "generate").click()
    message = wait.until(lambda d: (m := d.find_element(By.ID, "message")).get_attribute("class") == "error" and m)
    assert "width" in message.text and "limit of 128" in message.text


def test_page_runs_the_hires_fix_with_another_checkpoint(browser, server):
    """The hires box: a model upscaler-free "Latent" pass at 1.5x with tiny-b as the hires checkpoint."""
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#hr-checkpoint option"))
    browser.find_element(By.ID, "hires-box").click()  # open the details
    fill(browser, prompt="a harbour", width=64, height=64, steps=2, seed=3, hr_scale=1.5, hr_steps=2)
    browser.find_element(By.ID, "enable-hr").click()
    Select(browser.find_element(By.ID, "hr-checkpoint")).select_by_value("tiny-b")
    browser.find_element(By.ID, "generate").click()
    card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card"))[0]
    image = card.find_element(By.TAG_NAME, "img")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 96
    assert "Hires checkpoint: tiny [b2b2b2b2b2]" in card.find_element(By.TAG_NAME, "pre").text


def test_page_runs_img2img_from_an_uploaded_image(browser, server, models_dir, tmp_path):
    """The image-to-image box: an uploaded init image and a denoising strength, then a mask too; the jobs are the
    library's img2img and inpainting (the page fills in the model's defaults), images and parameters."""
    import numpy as np
    from PIL import Image

    from mlx_sd.pipeline import Pipeline

    path = tmp_path / "init.png"
    init = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    init.save(path)
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sampler option"))
    browser.find_element(By.ID, "img2img-box").click()
    fill(browser, prompt="a red boat", width=64, height=64, steps=4, seed=6, strength=0.5)
    browser.find_element(By.ID, "init-image").send_keys(str(path))
    browser.find_element(By.ID, "generate").click()
    card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card"))[0]
    expected = Pipeline(models_dir / "tiny-a").generate(prompt="a red boat", width=64, height=64, steps=4, seed=6,
                                                        init_image=init, strength=0.5)  # fmt: skip
    assert card.find_element(By.TAG_NAME, "pre").text == expected.infotexts[0]
    png = server.get(f"/v1/jobs/{card.get_attribute('data-job-id')}/images/0").content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(expected.images[0]))

    # with a mask: inpainting, as the library inpaints
    mask_path = tmp_path / "mask.png"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(mask_path)
    browser.find_element(By.ID, "mask-image").send_keys(str(mask_path))
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 2)
    card = browser.find_elements(By.CSS_SELECTOR, "#gallery .card")[0]  # the newest first
    expected = Pipeline(models_dir / "tiny-a").generate(prompt="a red boat", width=64, height=64, steps=4, seed=6,
                                                        init_image=init, mask=mask, strength=0.5)  # fmt: skip
    assert card.find_element(By.TAG_NAME, "pre").text == expected.infotexts[0]
    png = server.get(f"/v1/jobs/{card.get_attribute('data-job-id')}/images/0").content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(expected.images[0]))
