"""The page of nsn-serve in a real headless Chromium (Debian's chromium and chromium-driver, driven
through Selenium): it loads without console errors, its timeline follows a fake sysfs tree as it
heats, the shown rank drops as the governor acts, a prompt streams tokens coloured by the rank they
ran at, the override slider moves the rank /metrics reports, the API key stays out of URLs, and
model- or user-provided text is shown as text."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("NSN_REQUIRE_BROWSER"):  # CI installs them: a missing browser is a failure there
            pytest.fail("Debian's chromium and chromium-driver are not installed")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, what: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def set_temp(path: Path, temp_c: float) -> None:
    """As the kernel updates a sysfs value: a reader never sees the file half written (an empty read
    is a missing sensor, which rightly gives the safe rank)."""
    scratch = path.with_name(".temp")
    scratch.write_text(f"{int(temp_c * 1000)}\n")
    os.replace(scratch, path)


def sysfs(root: Path, temp_c: float) -> Path:
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "trip_point_0_type").write_text("passive\n")
    (zone / "trip_point_0_temp").write_text("85000\n")
    set_temp(zone / "temp", temp_c)
    return zone / "temp"


@pytest.fixture(scope="module")
def governed(serve, exported, tmp_path_factory):
    """A decoder served under a governor whose sysfs tree the test heats. Its model name is markup:
    the page must show it as text."""
    root = tmp_path_factory.mktemp("page")
    temp = sysfs(root / "sysfs", 50.0)
    policy = root / "p.toml"
    policy.write_text('[levels]\nranks = [2, 8, 16]\nmin_dwell_s = 0\n[thermal]\nzones = ["cpu-thermal"]\n')
    server = serve([exported("llama")[0].path.parent, "--policy", policy, "--sysfs-root", root / "sysfs",
                    "--period-s", "0.2", "--model-name", "<img src=x id=injected>"])
    return server, temp


def open_page(driver, url: str) -> None:
    """Load the page with a clean console (the log keeps what earlier tests left)."""
    driver.get_log("browser")
    driver.get(url)


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_page_loads_without_console_errors_and_shows_model_text_as_text(browser, governed):
    server, _ = governed
    open_page(browser, server.url + "/")
    wait_for(lambda: "requests served" in text(browser, "status-line"), "the status line")
    status = text(browser, "status-line")
    assert "model <img src=x id=injected>" in status and "ONNX Runtime" in status and "levels 2, 8, 16" in status
    assert "governor on" in status and "thermal control off" not in status  # the tree has a trip point
    assert text(browser, "last-rank-label").lower() == "last token"
    assert browser.find_element("id", "max-tokens").is_displayed()
    assert not browser.find_elements("id", "injected")  # shown as text, never parsed as markup
    wait_for(lambda: text(browser, "rank-now") not in ("", "—"), "the first tick")
    wait_for(lambda: text(browser, "level-now").startswith("level ("), "the ceiling's rank on its level")
    assert "layers as dense products" in text(browser, "level-now")
    assert console_errors(browser) == []
    headers = httpx.get(server.url + "/", timeout=10).headers
    assert "script-src 'self'" in headers["content-security-policy"]


def test_the_timeline_follows_the_device_as_it_heats_and_the_shown_rank_drops(browser, governed):
    server, temp = governed
    open_page(browser, server.url + "/")
    chart = lambda: browser.find_element("id", "chart-temp")  # noqa: E731
    wait_for(lambda: chart().get_attribute("data-last") == "50", "the first temperature")
    samples = int(chart().get_attribute("data-samples"))
    set_temp(temp, 70.0)
    wait_for(lambda: chart().get_attribute("data-last") == "70", "the timeline to show 70 degC")
    assert int(chart().get_attribute("data-samples")) > samples
    wait_for(lambda: text(browser, "rank-now") == "16", "the full rank at 70 degC")
    set_temp(temp, 95.0)  # past the trip + 5 degC: the emergency level
    wait_for(lambda: text(browser, "rank-now") == "2", "the shown rank to drop to 2")
    assert text(browser, "policy-now") == "thermal" and "emergency" in text(browser, "reason-now")
    assert browser.find_element("id", "chart-rank").get_attribute("data-last") == "2"
    set_temp(temp, 50.0)
    wait_for(lambda: text(browser, "rank-now") == "16", "the rank to climb back")
    assert console_errors(browser) == []


def send_prompt(driver, prompt: str, max_tokens: int, max_rank: int | None = None) -> dict:
    """Type a prompt in the playground, send it, and return the response's ``nsn`` object."""
    driver.find_element("id", "prompt").send_keys(prompt)
    if max_rank is not None:
        driver.find_element("id", "max-rank").send_keys(str(max_rank))
    driver.find_element("id", "max-tokens").clear()
    driver.find_element("id", "max-tokens").send_keys(str(max_tokens))
    driver.find_element("id", "send").click()
    return json.loads(wait_for(lambda: driver.find_element("id", "result-nsn").get_attribute("textContent"),
                               "the response's nsn object"))


def test_a_prompt_streams_tokens_coloured_by_the_rank_they_ran_at(browser, governed):
    server, _ = governed
    open_page(browser, server.url + "/")
    wait_for(lambda: text(browser, "rank-now") == "16", "the first tick")
    nsn = send_prompt(browser, "w1 w2 w3 <script>alert(1)</script>", 12, max_rank=8)
    spans = browser.find_elements("css selector", "#output .token")
    assert [int(s.get_attribute("data-rank")) for s in spans] == nsn["token_ranks"] and set(nsn["token_ranks"]) == {8}
    legend = {int(s.get_attribute("data-rank")): s.value_of_css_property("background-color")
              for s in browser.find_elements("css selector", "#legend .swatch")}
    assert legend.keys() == {8}
    assert all(s.value_of_css_property("background-color") == legend[8] for s in spans)
    assert "ranks first 8" in text(browser, "result") and console_errors(browser) == []


def test_concurrent_streams_show_on_the_page_as_a_shared_decode_batch(browser, governed):
    """Six clients stream at once: the server decodes them in shared calls, and the page's "batch"
    shows more than one sequence per call (bursts are repeated until a tick has seen one, at most 10)."""
    import threading

    server, _ = governed
    open_page(browser, server.url + "/")
    wait_for(lambda: text(browser, "rank-now") == "16", "the first tick")
    seen = []

    def burst():
        def one(n):
            httpx.post(f"{server.url}/v1/completions", json={"prompt": [n + 3, 5], "max_tokens": 100,
                                                             "ignore_eos": True}, timeout=60)
        threads = [threading.Thread(target=one, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            seen.append(text(browser, "batch-now"))
        for _ in range(5):  # the tick after the burst
            time.sleep(0.1)
            seen.append(text(browser, "batch-now"))

    for _ in range(10):
        burst()
        if any(value not in ("", "—") and float(value) > 1 for value in seen):
            break
    assert any(value not in ("", "—") and float(value) > 1 for value in seen), seen
    assert console_errors(browser) == []


def test_the_override_slider_moves_the_rank_metrics_report(browser, governed):
    server, _ = governed
    open_page(browser, server.url + "/")
    wait_for(lambda: text(browser, "rank-now") == "16", "the first tick")
    browser.execute_script("const s = document.getElementById('override-rank'); s.value = '8';"
                           "s.dispatchEvent(new Event('input'));")
    browser.find_element("id", "override-apply").click()
    wait_for(lambda: server.metric("nsn:rank_ceiling") == 8.0, "/metrics to report rank 8")
    wait_for(lambda: text(browser, "rank-now") == "8", "the page to show rank 8")
    assert "Ceiling set to rank 8" in text(browser, "override-message")
    browser.find_element("id", "override-release").click()
    wait_for(lambda: server.metric("nsn:rank_ceiling") == 16.0, "the release")


def test_a_phone_sized_screen_needs_no_sideways_scrolling(browser, governed):
    server, _ = governed
    browser.set_window_size(390, 844)
    try:
        open_page(browser, server.url + "/")
        wait_for(lambda: text(browser, "rank-now") not in ("", "—"), "the first tick")
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        browser.set_window_size(1280, 1000)


def test_with_a_key_the_page_asks_once_keeps_it_out_of_urls_and_says_when_refused(browser, serve, exported):
    server = serve([exported("bert")[0].path.parent, "--no-governor", "--model-name", "enc"],
                   env={"NSN_API_KEY": "sesame"})
    open_page(browser, server.url + "/")
    wait_for(lambda: browser.find_element("id", "key-box").is_displayed(), "the key box")
    browser.find_element("id", "override-apply").click()
    wait_for(lambda: "needs its API key" in text(browser, "override-message"), "the override refused")
    browser.find_element("id", "key-input").send_keys("sesame")
    browser.find_element("id", "key-form").submit()
    wait_for(lambda: "model enc" in text(browser, "status-line"), "the status with the key")
    assert "no governor (fixed rank)" in text(browser, "status-line")
    # an encoder: the figure is the latest batch's rank, and there is no max_tokens to set
    assert text(browser, "last-rank-label").lower() == "last batch"
    assert not browser.find_element("id", "max-tokens").is_displayed()
    wait_for(lambda: text(browser, "policy-now") == "none (no governor)", "the binding policy named")
    assert "sesame" not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('nsn-api-key')") == "sesame"
    browser.find_element("id", "prompt").send_keys("w1 w2 <script>alert(1)</script>")
    browser.find_element("id", "send").click()
    wait_for(lambda: "<script>alert(1)</script>" in text(browser, "output"), "the embedding of the typed text")
    assert not browser.find_elements("css selector", "#output script")
    browser.execute_script("sessionStorage.clear()")


@pytest.fixture(scope="module")
def tensorrt_served(exported, tmp_path_factory):
    """nsn-serve's app over an NSNEngine on the TensorRT double, two rank ranges, in this process (the
    double lives here) behind a real uvicorn on a loopback port."""
    import threading

    import uvicorn

    import trt_double
    from deploy.serve.app import ServerState, create_app
    from deploy.serve.cli import start_model
    from deploy.serve.metrics import Metrics
    from deploy.tensorrt.build import build_engine
    from deploy.tensorrt.engine import NSNEngine
    from deploy.tensorrt.plan import ShapeBounds, plan_for_export

    cudart = trt_double.make_cudart()
    trt = trt_double.make_tensorrt(cudart)
    export = exported("llama")[0].path.parent
    plan = plan_for_export(export, "1-5,6-16", ShapeBounds(max_seq=32, max_context=64, opt_seq=8, opt_context=16))
    engine_dir = build_engine(export, tmp_path_factory.mktemp("trt") / "engine", plan, trt=trt, cudart=cudart)
    engine = NSNEngine(engine_dir, trt=trt, cudart=cudart)
    state = ServerState(model_name="trt-llama", metrics=Metrics("trt-llama"))
    app = create_app(state, load=lambda: start_model(state, engine_dir, None, None, None, 64, 0.2, None, None,
                                                     runtime=engine))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "uvicorn to start")
    url = "http://127.0.0.1:%d" % server.servers[0].sockets[0].getsockname()[1]
    wait_for(lambda: httpx.get(url + "/health", timeout=5).status_code == 200, "the engine to load")
    yield url
    server.should_exit = True
    thread.join(timeout=30)
    state.scheduler.stop()
    state.ticker.set()
    engine.close()


def test_the_page_works_on_the_tensorrt_double_and_shows_profile_switches(browser, tensorrt_served):
    open_page(browser, tensorrt_served + "/")
    wait_for(lambda: "TensorRT 10.3.0" in text(browser, "status-line"), "the status line")
    wait_for(lambda: browser.find_element("id", "profiles").is_displayed(), "the profile switch count")
    before = int(text(browser, "profile-switches"))
    for max_rank in ("3", "12"):  # one rank in each range: the engine switches profiles
        browser.find_element("id", "prompt").clear()
        browser.find_element("id", "prompt").send_keys("w1 w2 w3")
        browser.find_element("id", "max-rank").clear()
        browser.find_element("id", "max-rank").send_keys(max_rank)
        browser.find_element("id", "send").click()
        wait_for(lambda: f"ranks first {max_rank}" in text(browser, "result"), f"a reply at rank {max_rank}")
    wait_for(lambda: int(text(browser, "profile-switches")) >= before + 2, "more profile switches shown")
    assert console_errors(browser) == []


@pytest.mark.slow
def test_a_simulated_heat_soak_on_the_page_and_its_screenshot(browser, serve, exported, tmp_path):
    """The device heats towards its trip point and soaks there; the governor holds it below the
    emergency level with a lower rank, and climbs back when it cools. The screenshot is the one in
    the README and docs/SERVING.md: NSN_UPDATE_SCREENSHOTS=1 writes it to docs/img/, and
    NSN_SCREENSHOT_MODEL=EXPORT_DIR takes it on a real chat model's export (SmolLM2, from
    ``nsn-quickstart --llm``) instead of the tiny random decoder."""
    from deploy.metadata import read_model_info

    real = os.environ.get("NSN_SCREENSHOT_MODEL")
    model = Path(real) if real else exported("llama")[0].path.parent
    top = read_model_info(model).max_rank
    levels = sorted({max(1, top * k // 8) for k in (1, 2, 4, 6, 8)})  # tiny: 2, 4, 8, 12, 16
    temp = sysfs(tmp_path / "sysfs", 45.0)
    policy = tmp_path / "p.toml"
    policy.write_text(f'[levels]\nranks = {levels}\nmin_dwell_s = 2\n[thermal]\nzones = ["cpu-thermal"]\n')
    server = serve([model, "--policy", policy, "--sysfs-root", tmp_path / "sysfs", "--period-s", "0.25",
                    "--model-name", "smollm2-135m-instruct-nsn" if real else "tiny-llama-nsn"])
    open_page(browser, server.url + "/")
    wait_for(lambda: text(browser, "rank-now") == str(top), "the first tick")
    ranks = []
    for temp_c in (45, 52, 58, 64, 69, 73, 77, 80, 82, 84, 85, 86, 85, 84, 83, 83, 82, 82, 82, 81, 82, 82):
        set_temp(temp, temp_c)
        time.sleep(1.0)
        ranks.append(int(text(browser, "rank-now")))
    assert ranks[0] == top and min(ranks) < top  # the governor lowered the rank as the device soaked
    if real:  # the device cools and the full rank comes back: the reply is the dense model's
        set_temp(temp, 50.0)
        wait_for(lambda: text(browser, "rank-now") == str(top), "the rank to climb back", timeout_s=60)
    browser.find_element("id", "prompt").send_keys("What is the capital of France?" if real else "w5 w17 w3")
    browser.find_element("id", "send").click()
    wait_for(lambda: "ranks first" in text(browser, "result"), "the playground's reply", timeout_s=120)
    if real:
        assert "Paris" in text(browser, "output")
    browser.find_element("id", "sensors").click()  # open the sensors list
    time.sleep(1.0)
    shot = tmp_path / "nsn-serve-page.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"
    assert console_errors(browser) == []
    if os.environ.get("NSN_UPDATE_SCREENSHOTS"):
        target = Path(__file__).resolve().parents[1] / "docs" / "img" / "nsn-serve-page.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(shot, target)


def test_a_governor_without_a_trip_point_says_thermal_control_is_off(browser, serve, exported, tmp_path):
    (tmp_path / "sysfs").mkdir()
    server = serve([exported("bert")[0].path.parent, "--sysfs-root", tmp_path / "sysfs", "--model-name", "cool"])
    open_page(browser, server.url + "/")
    wait_for(lambda: "model cool" in text(browser, "status-line"), "the status line")
    assert "governor on, thermal control off" in text(browser, "status-line")
    wait_for(lambda: text(browser, "policy-now") == "none", "the first tick")
    assert "thermal control off" in browser.find_element("id", "notes").get_attribute("textContent")


def test_tokens_drafted_by_a_lower_rank_and_kept_are_outlined_in_the_playground(browser, serve, exported):
    """Served with self-speculative decoding (rank 15 drafts for 16): the outlined tokens are the
    ones the draft proposed and the target kept, as many as the response's ``nsn.speculative``
    says were accepted, and the result line says so."""
    server = serve([exported("llama")[0].path.parent, "--no-governor", "--speculative", "15"])
    open_page(browser, server.url + "/")
    wait_for(lambda: text(browser, "rank-now") == "16", "the first tick")
    spec = send_prompt(browser, "w1 w2 w3", 40)["speculative"]
    outlined = browser.find_elements("css selector", "#output .token.drafted")
    assert spec["draft_rank"] == 15 and spec["accepted"] > 0 and len(outlined) == spec["accepted"]
    assert outlined[0].value_of_css_property("outline-style") == "solid"
    assert "drafted by rank 15" in text(browser, "result") and console_errors(browser) == []
