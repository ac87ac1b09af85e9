"""The live view in a real browser: Debian's headless Chromium driven by Selenium against a lab
with `ui` on loopback. Rows and what-if cases are run from the page; a client the page knows
nothing about (impacket, started by the test) must appear without a reload."""

from __future__ import annotations

import os

import pytest

from emulator.lab import Lab
from harness import browser

pytestmark = pytest.mark.skipif(browser.missing() is not None, reason=browser.missing() or "")

SCREENSHOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "img",
                          "live-view.png")


@pytest.fixture(scope="module")
def ui_lab():
    with Lab(ui="127.0.0.1:0") as lab:
        yield lab


@pytest.fixture(scope="module")
def page(ui_lab, tmp_path_factory):
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser.start_chromium(str(tmp_path_factory.mktemp("chromium-profile")))
    try:
        driver.get(ui_lab.ui_url)
        WebDriverWait(driver, 20).until(lambda d: d.find_element("id", "status").text == "live")
        yield driver
    finally:
        driver.quit()


def wait_for(driver, predicate, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: predicate(d))


def card_text(driver, conn: str) -> str:
    cards = driver.find_elements("id", f"conn-{conn}")
    return cards[0].text if cards else ""


def test_page_shows_the_lab_without_secrets(page, ui_lab):
    lab_text = page.find_element("id", "lab-body").text
    for user in ("alice", "bob", "carol"):
        assert user in lab_text
    assert "set" in lab_text
    assert ui_lab.password("alice") not in page.page_source
    assert f"emsmdb {ui_lab.host}:{ui_lab.ports['emsmdb']}" in lab_text


def test_running_np_uns_off_draws_alice_inherited_and_a_tick(page, ui_lab):
    page.find_element("id", "run-np-uns-off").click()
    match = lambda d: d.find_element("css selector", '#row-np-uns-off td[data-col="match"]').text  # noqa: E731
    wait_for(page, lambda d: match(d).startswith(("✓", "✗", "error")))
    assert match(page).startswith("✓"), match(page)
    acted = page.find_element("css selector", '#row-np-uns-off td[data-col="acting_user"]').text
    assert acted == "✓ CORP\\alice"
    # The row's SMB connection: its card says whose identity and why, then the verdict from the capture.
    smb_conn = [r["conn"] for r in ui_lab.records("emsmdb.connect", acting_user="CORP\\alice")][-1]
    wait_for(page, lambda d: "Verdict:" in card_text(d, smb_conn))
    text = card_text(page, smb_conn)
    assert "CORP\\alice" in text
    assert "inherited from the SMB session" in text
    assert "inherited: acting as CORP\\alice" in text
    svg = page.find_element("css selector", f"#conn-{smb_conn} .ladder svg").get_attribute("outerHTML")
    assert "◆ auth" in svg and "◆ identity" in svg


def test_screenshot_at_1280x720_is_not_blank(page):
    """Taken after the np-uns-off row, so the picture shows alice's inherited identity."""
    # The top of the page, as a class first sees it.
    page.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);"
                        "document.querySelectorAll('.scroll').forEach(e => { e.scrollLeft = 0; });")
    png = page.get_screenshot_as_base64()
    page.set_script_timeout(20)
    stats = page.execute_async_script(browser.PIXEL_VARIETY_JS, png)
    assert stats is not None, "the browser could not decode its own screenshot"
    assert (stats["width"], stats["height"]) == (1280, 720)
    assert stats["colours"] > 20, stats
    assert 0.02 < stats["not_white"] < 0.98, stats
    if os.environ.get("RPCAUTH_WRITE_SCREENSHOT") == "1":
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        page.save_screenshot(SCREENSHOT)


def test_what_if_over_tcp_reads_replaced_by_bob(page, ui_lab):
    form = page.find_element("id", "whatif-form")
    order = form.find_element("name", "binding_order")
    order.clear()
    order.send_keys("ncacn_ip_tcp")
    typed = form.find_element("name", "typed")
    typed.clear()
    typed.send_keys("bob")
    before = len(ui_lab.records("emsmdb.connect"))
    page.find_element("id", "whatif-run").click()
    wait_for(page, lambda d: "server acted as" in d.find_element("id", "whatif-result").text)
    assert "CORP\\bob" in page.find_element("id", "whatif-result").text
    conn = ui_lab.records("emsmdb.connect")[before]["conn"]
    wait_for(page, lambda d: "replaced" in card_text(d, conn))
    text = card_text(page, conn)
    assert "replaced by CORP\\bob's credentials" in text


def test_what_if_bad_input_gets_the_servers_message(page):
    form = page.find_element("id", "whatif-form")
    logged_on = form.find_element("name", "logged_on")
    logged_on.clear()
    logged_on.send_keys("eve")
    page.find_element("id", "whatif-run").click()
    wait_for(page, lambda d: d.find_element("id", "whatif-error").text)
    assert "unknown user 'eve'" in page.find_element("id", "whatif-error").text
    logged_on.clear()
    logged_on.send_keys("alice")


def test_a_client_outside_the_page_appears_without_reload(page, ui_lab):
    from impacket.dcerpc.v5 import transport
    from impacket.dcerpc.v5.rpcrt import RPC_C_AUTHN_LEVEL_CONNECT, RPC_C_AUTHN_WINNT
    from impacket.uuid import uuidtup_to_bin

    marker = page.execute_script("window.__same_page = 1; return window.__same_page;")
    rt = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{ui_lab.ports['emsmdb']}]")
    rt.set_credentials("carol", ui_lab.password("carol"), "CORP")
    dce = rt.get_dce_rpc()
    dce.set_auth_type(RPC_C_AUTHN_WINNT)
    dce.set_auth_level(RPC_C_AUTHN_LEVEL_CONNECT)
    dce.connect()
    local = rt.get_socket().getsockname()[1]
    dce.bind(uuidtup_to_bin(("a4f1db00-ca47-1067-b31f-00dd010662da", "0.81")))
    dce.disconnect()
    conn = [r["conn"] for r in ui_lab.records("conn.open") if r["peer"].endswith(f":{local}")][-1]
    wait_for(page, lambda d: "CORP\\carol" in card_text(d, conn))
    assert "replaced" in card_text(page, conn)
    assert page.execute_script("return window.__same_page;") == marker       # no reload happened
