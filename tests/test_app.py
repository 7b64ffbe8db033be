"""The web app (``python -m sample.app``) on the shipped checkpoints, served on 127.0.0.1: a real browser
(headless Chromium through Selenium) runs a prompt, reads the result and its PNG, hits a bad size and
cancels; the page's "copy as command" is run as ``python -m sample`` and must give the same file; two
requests sent at once through Gradio's client finish in order, each with its own settings.

``APP_SCREENSHOT=docs/app.png python -m pytest tests/test_app.py`` also saves the screenshot in docs/sampling.md.
"""
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="the web app needs the app extra: pip install -e '.[app]'")
from gradio_client import Client  # noqa: E402  (comes with gradio)
from PIL import Image  # noqa: E402

try:  # the browser tests' driver (the test extra); without it they skip, saying why
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:
    webdriver = None

from sample.__main__ import main as sample_main  # noqa: E402
from sample.app import Studio, request_argv, serve, warm  # noqa: E402
from common.errors import run_command  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(height="64", width="64", prior_steps="4", decoder_steps="2")  # seconds per request on a CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on the shipped checkpoints, on a free localhost port (closed after the module)."""
    studio = Studio([], tmp_path_factory.mktemp("app"), str(ROOT / "checkpoints/tiny/previewer.safetensors"),
                    preview_every=1)
    warm(studio)
    port = _free_port()
    demo = serve(studio, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", studio
    demo.close()


def _browser_or_skip():
    if webdriver is None:
        pytest.skip("the browser tests need selenium: pip install -e '.[test]'")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no headless browser: apt-get install chromium chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


@pytest.fixture(scope="module")
def page(server):
    """Chromium on the app's page (one browser for the module)."""
    browser = _browser_or_skip()
    browser.get(server[0])
    yield browser
    browser.quit()


def _wait(condition, timeout=120.0, what="the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def _field(page, elem_id):
    return _wait(lambda: page.find_elements(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input"),
                 30, f"#{elem_id}")[0]


def _type(page, elem_id, text):
    field = _field(page, elem_id)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)


def _text(page, elem_id):
    return page.find_element(By.ID, elem_id).text.strip()


def _click(page, elem_id):
    page.find_element(By.ID, elem_id).click()


def _status(page, start: str, timeout=120.0):
    return _wait(lambda: _text(page, "status") if _text(page, "status").startswith(start) else None, timeout,
                 f"a status starting {start!r} (now {_text(page, 'status')!r})")


def _fill(page, **fields):
    for name, text in fields.items():
        _type(page, name.replace("_", "-"), text)


@pytest.fixture(scope="module")
def page_run(page, server):
    """A prompt typed and run in the page: its status, PNG (downloaded from the page) and command."""
    _fill(page, prompt="red apple", seed="7", **SMALL)
    _wait(lambda: "64 x 64" in _text(page, "size-note"), 10, "the size note")
    _click(page, "run")
    status = _status(page, "done")
    links = page.find_elements(By.CSS_SELECTOR, "#files a[href]")
    png = urllib.request.urlopen(links[0].get_attribute("href")).read()
    shown = page.find_elements(By.CSS_SELECTOR, "#gallery img")
    bars = {b.get_attribute("data-stage"): (b.get_attribute("data-done"), b.get_attribute("data-steps"))
            for b in page.find_elements(By.CSS_SELECTOR, "#stage-progress .stage-bar")}
    previews = page.find_elements(By.CSS_SELECTOR, "#preview img")
    if os.environ.get("APP_SCREENSHOT"):  # the picture of the page in docs/sampling.md
        page.set_window_size(1400, 1330)
        page.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        page.save_screenshot(os.environ["APP_SCREENSHOT"])
    return dict(status=status, png=png, command=_field(page, "command").get_attribute("value"), links=links,
                shown=shown, bars=bars, previews=previews, page=page)


@pytest.mark.slow
def test_page_runs_a_prompt_and_its_png_carries_the_settings(page_run):
    assert page_run["status"].startswith("done: 1 image(s) of 64 x 64 px, seed 7"), page_run["status"]
    assert len(page_run["links"]) == 1 and page_run["shown"]
    assert page_run["page"].execute_script("return arguments[0].naturalWidth", page_run["shown"][0]) > 0
    assert page_run["bars"] == {"Stage C": ("4", "4"), "Stage B": ("2", "2")}  # a bar per stage, both full
    assert page_run["previews"], "no Stage C preview was shown"
    image = Image.open(io.BytesIO(page_run["png"]))
    assert image.size == (64, 64)
    settings = json.loads(image.text["settings"])
    assert (settings["prompts"], settings["seed"], settings["height"], settings["width"]) == (["red apple"], 7, 64, 64)
    assert (settings["prior_steps"], settings["decoder_steps"], settings["decoder"]) == (4, 2, "semantic")
    assert image.text["command"] == page_run["command"]
    assert page_run["command"].startswith("python -m sample 'red apple' --seed 7 ")
    # the empty decoder-guidance field is the decoder's own (2 for Stage B), not 0
    assert settings["decoder_guidance"] == 2.0 and "--decoder-guidance 2.0 " in page_run["command"]


@pytest.mark.slow
def test_copy_as_command_reproduces_the_page_image_bit_for_bit(page_run, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run(["bash", "-c", page_run["command"]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / shlex.split(page_run["command"])[shlex.split(page_run["command"]).index("--out") + 1]
    assert out.read_bytes() == page_run["png"]  # same pixels, same embedded settings and command


@pytest.mark.slow
def test_a_bad_size_shows_the_commands_error_in_the_page(page_run, capsys):
    page = page_run["page"]
    _type(page, "height", "0")
    _click(page, "run")
    shown = _status(page, "error", 30)
    with pytest.raises(SystemExit):
        run_command(sample_main, ["red apple", "--height", "0"])
    cli = capsys.readouterr().err.strip().splitlines()[-1]  # python -m sample: error: argument --height: ...
    # the command's line, without its pointer to --help (the page has no --help)
    assert cli.endswith(" (see python -m sample --help)")
    assert shown == "error: " + cli.split("error: ", 1)[1].removesuffix(" (see python -m sample --help)")
    assert shown == "error: argument --height: must be at least 1, got 0"
    _type(page, "height", "64")


@pytest.mark.slow
def test_cancel_stops_the_work_promptly(page_run, server):
    page, studio = page_run["page"], server[1]
    _type(page, "prior-steps", "400")
    _click(page, "run")
    _status(page, "running", 60)
    _wait(lambda: page.execute_script(
        "const b = document.querySelector('#stage-progress .stage-bar'); return b && b.dataset.done > 0"), 60,
        "a Stage C step")
    start = time.monotonic()
    _click(page, "cancel")
    _status(page, "cancelled", 15)
    assert studio.lock.acquire(timeout=15), "sampling went on after Cancel"
    studio.lock.release()
    assert time.monotonic() - start < 15
    _type(page, "prior-steps", "4")


@pytest.mark.slow
def test_two_requests_at_once_finish_in_order_with_their_own_settings(server):
    client = Client(server[0], verbose=False)

    def submit(prompt, seed, height):
        return client.submit(prompt, "", str(seed), 1, height, 64, "4", "2", "4", "3", "ddpm", "ddpm",
                             "Stage B + Stage A", "", None, 0.6, api_name="/generate")

    first = submit("red apple", 1, 64)
    seen = []
    _wait(lambda: seen.append(first.status().code.name) or seen[-1] in ("PROCESSING", "ITERATING", "PROGRESS")
          or first.done(), 60,
          lambda: f"the first request to start (status {seen[-3:]}, model lock held: {server[1].lock.locked()})")
    second = submit("blue heart", 2, 96)
    finished = []
    _wait(lambda: [finished.append(j) for j in (first, second) if j.done() and j not in finished]
          and len(finished) == 2, 180, "both requests")
    assert finished == [first, second]
    for job, (prompt, seed, size) in ((first, ("red apple", 1, (64, 64))), (second, ("blue heart", 2, (64, 96)))):
        *_, files, command, status = job.result()
        image = Image.open(files[0])
        settings = json.loads(image.text["settings"])
        assert (settings["prompts"], settings["seed"], image.size) == ([prompt], seed, size), status
        assert command == image.text["command"] and f"--seed {seed}" in command


def test_page_fields_become_the_commands_arguments(tmp_path):
    argv = request_argv("-minus sign", "blue", "random", 2.0, 96.0, None, "1,0.5,0", "", 4.5, " 1 ", "ddim", "ddpm",
                        "pixel decoder", "a.safetensors:0.5\n\n b.safetensors ", None, 0.6, ["--stage-c", "c.st"],
                        tmp_path / "x.png")
    seed = argv[argv.index("--seed") + 1]
    assert 0 <= int(seed) < 2**32
    assert argv == ["--stage-c", "c.st", "--seed", seed, "--decoder", "pixel", "--out", str(tmp_path / "x.png"),
                    "--quiet", "--n", "2", "--height", "96", "--prior-steps", "1,0.5,0", "--prior-guidance", "4.5",
                    "--decoder-guidance", "1", "--prior-sampler", "ddim", "--lora", "a.safetensors:0.5",
                    "--lora", "b.safetensors", "--", "-minus sign"]
    # an image without a prompt: variations (no strength); with one: img2img at the slider's strength
    assert request_argv("", "", "0", 1, None, None, "4", "", 4, 3, "ddpm", "ddpm", "pixel decoder", "", "in.png", 0.6,
                        [], tmp_path / "x.png")[-3:] == ["--image", "in.png", "--"]
    assert request_argv("sun", "", "0", 1, None, None, "4", "", 4, 3, "ddpm", "ddpm", "pixel decoder", "", "in.png",
                        0.6, [], tmp_path / "x.png")[-6:] == ["--image", "in.png", "--strength", "0.6", "--", "sun"]


def test_control_fields_become_the_commands_control_options(tmp_path):
    base = ("sun", "", "0", 1, None, None, "4", "", 4, 3, "ddpm", "ddpm", "Stage B + Stage A", "", None, 0.6, [],
            tmp_path / "x.png")
    assert request_argv(*base, "inpaint", "c.png", "m.png", 0.5, True)[-11:] == [
        "--control", "inpaint", "--control-scale", "0.5", "--control-image", "c.png", "--mask", "m.png",
        "--keep-unmasked", "--", "sun"]
    assert request_argv(*base, "canny", "c.png", None, 1.0, False)[-6:] == [
        "--control", "canny", "--control-image", "c.png", "--", "sun"]  # scale 1 is the default
    # the page's text fields: an empty scale or guidance is the command's default, not 0
    assert request_argv(*base, "canny", "c.png", None, " ", False)[-6:] == [
        "--control", "canny", "--control-image", "c.png", "--", "sun"]
    assert "--control-scale 0.5" in " ".join(request_argv(*base, "canny", "c.png", None, "0.5", False))
    no_guidance = list(base)
    no_guidance[8] = ""
    assert "--prior-guidance" not in request_argv(*no_guidance)
    # a control image without a ControlNet goes to the parser, which names the mistake
    assert request_argv(*base, "none", "c.png", None, 1.0, False)[-4:] == ["--control-image", "c.png", "--", "sun"]


def _final(studio, prompt, **control):
    """The last (files, command, status) of one request run through the page's handler."""
    fields = dict(negative="", seed="3", n=1, height=64, width=64, prior_steps="3", decoder_steps="2",
                  prior_guidance=4.0, decoder_guidance=None, prior_sampler="ddpm", decoder_sampler="ddpm",
                  decoder="Stage B + Stage A", loras="", image=None, strength=0.6)
    *_, last = studio.generate(prompt, *fields.values(), **control)
    return last[3:]


def test_page_runs_the_controlnets_and_names_their_mistakes(tmp_path):
    studio = Studio([], tmp_path / "out", None)
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[16:48, 16] = edges[16:48, 47] = edges[16, 16:48] = edges[47, 16:48] = 255  # a white square outline
    Image.fromarray(edges).save(tmp_path / "edges.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # repaint the right half
    Image.fromarray(mask).save(tmp_path / "mask.png")

    files, command, status = _final(studio, "red apple", control="canny", control_image=str(tmp_path / "edges.png"))
    assert status.startswith("done: 1 image(s) of 64 x 64"), status
    with Image.open(files[0]) as image:
        settings, embedded = json.loads(image.text["settings"]), image.text["command"]
    kept = settings["control_image"]  # the upload is kept beside the result, so the command stays runnable
    assert settings["control"] == "canny" and Path(kept).parent == (tmp_path / "out").resolve()
    assert command == embedded and f"--control canny --control-image {kept}" in command

    files, command, status = _final(studio, "blue heart", control="inpaint",
                                    control_image=str(tmp_path / "edges.png"), mask=str(tmp_path / "mask.png"),
                                    control_scale=0.8, keep_unmasked=True)
    assert status.startswith("done"), status
    assert all(part in command for part in ("--control inpaint", "--control-scale 0.8", "--mask ", "--keep-unmasked"))

    *_, status = _final(studio, "sun", control="canny", control_image=str(tmp_path / "edges.png"),
                        mask=str(tmp_path / "mask.png"))
    assert status.startswith("error: ") and "--mask" in status and "\n" not in status
    *_, status = _final(studio, "sun", control_image=str(tmp_path / "edges.png"))
    assert status.startswith("error: ") and "--control and --control-image go together" in status


@pytest.mark.slow
def test_a_cleared_guidance_field_means_the_commands_default(page_run):
    """Guidance is a text field: a cleared Number would reach the command as guidance 0 (unconditional)."""
    page = page_run["page"]
    _type(page, "prior-guidance", "")
    _click(page, "run")
    _status(page, "done")
    command = _field(page, "command").get_attribute("value")
    assert "--prior-guidance 4.0 " in command, command
    _type(page, "prior-guidance", "4")
