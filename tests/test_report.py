"""The night report: pure parts on known inputs, and the page of a real small night opened
in Debian's headless chromium."""
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from survey_qa.cli import main
from survey_qa.pipeline import nightview

NIGHT = "2024-06-01"
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT_DIR = Path(os.environ.get("SURVEY_QA_SCREENSHOTS", ROOT / "bench" / "out"))


def test_preview_bins_and_stretches():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 5, (1000, 600)).astype(np.float32)
    img[500, 300] = 1e5
    mask = np.zeros(img.shape, bool)
    mask[:100] = True
    out = nightview.preview(img, mask, max_side_px=200)
    assert out.shape == (200, 120)  # a factor of 5 both ways
    assert out.min() >= 0 and out.max() <= 1
    assert out[100, 60] == out.max()  # the star's block is the brightest
    assert np.all(out[:20] == 0)  # masked blocks are empty


def test_stored_preview_is_the_preview_to_a_255th():
    """The preview written to the array store where the frame is measured comes back as
    the preview the report would make from the frame (to the uint8 step)."""
    rng = np.random.default_rng(1)
    img = rng.normal(100, 5, (1000, 600)).astype(np.float32)
    img[500, 300] = 1e5
    stored = nightview.preview_arrays(img, None)
    assert stored["preview"].shape == (nightview.PREVIEW_SIDE_PX,) * 2
    back = nightview.stored_preview(stored["preview"], stored["preview_shape"])
    direct = nightview.preview(img, None, nightview.PREVIEW_SIDE_PX)
    assert back.shape == direct.shape
    assert np.abs(back - direct).max() <= 0.5 / 255 + 1e-6
    assert nightview.stored_preview(stored["preview"], np.zeros(2, np.int32)) is None


def test_focal_plane_from_detsec_crpix_or_grid():
    dets = [("A", {"DETSEC": "[1:100,1:200]", "NAXIS1": 100, "NAXIS2": 200}),
            ("B", {"DETSEC": "[101:200,1:200]", "NAXIS1": 100, "NAXIS2": 200})]
    placed, how = nightview.focal_plane(dets)
    assert how == "DETSEC" and [(p.x0, p.y0, p.nx, p.ny) for p in placed] == [
        (0, 0, 100, 200), (100, 0, 100, 200)]
    wcs = [("A", {"CRPIX1": 1.0, "CRPIX2": 1.0, "CRVAL1": 10, "CRVAL2": 20, "NAXIS1": 50,
                  "NAXIS2": 50}),
           ("B", {"CRPIX1": -59.0, "CRPIX2": 1.0, "CRVAL1": 10, "CRVAL2": 20, "NAXIS1": 50,
                  "NAXIS2": 50})]
    placed, how = nightview.focal_plane(wcs)
    assert how == "CRPIX" and [(p.x0, p.y0) for p in placed] == [(0, 0), (60, 0)]
    placed, how = nightview.focal_plane([(str(i), {"NAXIS1": 10, "NAXIS2": 10})
                                         for i in range(4)])
    assert how == "grid" and len({(p.x0, p.y0) for p in placed}) == 4


def test_summary_says_what_went_wrong_and_when():
    times = ["2024-06-01T21:00:00", "2024-06-01T21:10:00", "2024-06-01T21:20:00",
             "2024-06-01T23:00:00", "2024-06-02T01:00:00"]
    classes = ["good", "bad_seeing", "bad_seeing", "good", "good"]
    status = ["ok", "ok", "ok", "ok", "failed"]
    lines = nightview.summary_lines(times, classes, status, ["", "", "", "", "unreadable: x"])
    assert lines[0].startswith("2 of 5 sky exposures are usable")
    assert "bad seeing: 2 exposures (UTC 21:10-21:20)" in lines
    assert lines[-1] == "1 could not be measured: unreadable (1)"
    types = ["light", "light", "light", "dark", "bias"]  # calibration frames set aside
    lines = nightview.summary_lines(times, classes, ["ok"] * 3 + ["failed"] * 2, [""] * 5,
                                    types)
    assert lines[0].startswith("1 of 3 sky exposures are usable")
    assert lines[-1] == "2 calibration frames set aside (bias 1, dark 1)."
    assert not any("could not be measured" in line for line in lines)


@pytest.fixture(scope="module")
def processed_night(tmp_path_factory):
    """Four simulated frames (one a mosaic) through the nightly command."""
    from survey_qa.flows.simulate import simulate_night

    base = tmp_path_factory.mktemp("report")
    raw, out = base / "raw", base / "out"
    simulate_night(raw, NIGHT, 4, seed=4, size_px=384)
    cfg = base / "cfg.yaml"
    cfg.write_text("cluster:\n  workers: 1\n  dashboard_address: null\n"
                   "run:\n  progress: false\n  classifier: rules\n")
    assert main(["--night", NIGHT, "--raw-root", str(raw), "--out-root", str(out),
                 "--config", str(cfg)]) == 0
    return raw, out


@pytest.mark.slow
def test_report_is_self_contained(processed_night):
    raw, out = processed_night
    page = out / "reports" / f"{NIGHT}.html"
    assert page.is_file()  # the nightly command writes it
    assert main(["report", "--night", NIGHT, "--out-root", str(out)]) == 0
    text = page.read_text()
    # no network needed: no external script, stylesheet or image
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=["']https?:""", text)
    assert "data:image/png;base64," in text
    exposures = pd.read_parquet(out / "catalogs" / "exposures" / f"night={NIGHT}")
    for e in exposures["exposure"].unique():
        assert f'id="exp-{e}"' in text


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI") == "true":  # .ci/run installs them: their absence is a fault
            pytest.fail("chromium or chromedriver missing in CI")
        pytest.skip("chromium and chromium-driver (Debian packages) are not installed")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="survey-qa-chromium-")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
              "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    return driver, profile


@pytest.mark.slow
def test_report_in_a_real_browser(processed_night):
    from selenium.webdriver.common.by import By

    raw, out = processed_night
    page = out / "reports" / f"{NIGHT}.html"
    exposures = pd.read_parquet(out / "catalogs" / "exposures" / f"night={NIGHT}")
    n_exp = exposures["exposure"].nunique()
    driver, profile = _browser()
    try:
        driver.get(page.as_uri())
        driver.find_element(By.CSS_SELECTOR, "#timeline .main-svg")  # Plotly drew the plots
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        rows = driver.find_elements(By.CSS_SELECTOR, "#exposures tbody tr.exposure")
        assert len(rows) == n_exp
        visible = lambda: [r for r in driver.find_elements(  # noqa: E731
            By.CSS_SELECTOR, "#exposures tbody tr.exposure") if r.is_displayed()]
        assert len(visible()) == n_exp
        one = sorted(exposures["exposure"].unique())[1]
        box = driver.find_element(By.ID, "filter")
        box.send_keys(one)
        shown = visible()
        assert len(shown) == 1 and one in shown[0].text
        box.clear()
        box.send_keys("x")  # clear() fires no input event: type, then erase
        box.send_keys("\b")
        assert len(visible()) == n_exp
        # sort by FWHM: numbers in order, blanks last
        col = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "#exposures th")].index(
            "FWHM px")
        driver.find_elements(By.CSS_SELECTOR, "#exposures th")[col].click()
        values = [r.find_elements(By.TAG_NAME, "td")[col].text for r in visible()]
        numbers = [float(v) for v in values if v]
        assert numbers == sorted(numbers) and values[:len(numbers)] == [v for v in values if v]
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        driver.set_window_size(1400, 2200)
        assert driver.save_screenshot(str(SCREENSHOT_DIR / "report-simulated-night.png"))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
