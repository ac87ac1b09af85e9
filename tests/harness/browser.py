"""Debian's headless Chromium driven by Selenium, for the live view's tests."""

from __future__ import annotations

import os
import shutil

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,720")


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e .[test])"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) or shutil.which(os.path.basename(path))):
            return f"{path} is absent (apt-get install chromium chromium-driver)"
    return None


def start_chromium(profile_dir: str):
    """A fresh headless Chromium with its own profile directory; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    service = Service(executable_path=CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    # The page's viewport itself is 1280x720 (a projector), whatever the window's own chrome takes.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 720, "deviceScaleFactor": 1, "mobile": False})
    return driver


# Run in the page: load a PNG (as a data URL), and report how many distinct colours a grid of
# samples holds and which share of them is not white. The browser decodes the picture.
PIXEL_VARIETY_JS = """
const [b64, done] = arguments;
const img = new Image();
img.onload = () => {
  const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  const colours = new Set(); let notWhite = 0, n = 0;
  for (let y = 0; y < c.height; y += 4) for (let x = 0; x < c.width; x += 4) {
    const i = (y * c.width + x) * 4; n++;
    colours.add(d[i] + ',' + d[i+1] + ',' + d[i+2]);
    if (d[i] < 240 || d[i+1] < 240 || d[i+2] < 240) notWhite++;
  }
  done({width: img.width, height: img.height, colours: colours.size, not_white: notWhite / n});
};
img.onerror = () => done(null);
img.src = 'data:image/png;base64,' + b64;
"""
