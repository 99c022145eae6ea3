"""hwft board in a real browser: headless Chromium (Debian's package) driven by Selenium through
Debian's ChromeDriver of the same version, against ``hwft board`` started as a user starts it.

One walk through the page, as a user takes it: load a recipe for the tiny model from the
workspace's configs/, edit it in the form, see an option the backend refuses (and the CLI's
message when it is forced in through the YAML), start the run, watch its chart grow, stop it
(SIGTERM: a checkpoint), resume it to the end, compare it, preview its data, and chat with the
result. The server's guards (Host, token, change header, workspace, upload limit) are tested
in-process through Starlette's test client.

HWFT_BOARD_SCREENSHOTS=DIR saves a screenshot of each page there (docs/board/ holds them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, build_tiny_model, write_jsonl, write_recipe

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
#: Steps of the run the browser watches: long enough to be stopped and seen resuming (about 25 ms
#: a step for the tiny model here), short enough to finish soon after it resumes.
STEPS = 400


def browser_ready(wait: float = 300) -> str | None:
    """None when Chromium and ChromeDriver are here; else why not. ci/browser.sh installs them
    in the background while the suite starts: wait for its outcome."""
    done = REPO / ".venv" / ".browser-done"
    deadline = time.monotonic() + wait
    while not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        outcome = done.read_text().strip() if done.exists() else None
        if outcome is not None and outcome != "ok":
            return f"Chromium: {outcome}"
        if outcome is None and time.monotonic() > deadline or outcome == "ok":
            return "Chromium and ChromeDriver are not installed (bash ci/browser.sh installs them)"
        time.sleep(2)
    return None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer_dir) -> Path:
    """A workspace as a user has one: a model, data and a recipe in configs/."""
    ws = tmp_path_factory.mktemp("board")
    build_tiny_model("llama", ws / "tiny", tokenizer_dir)
    (ws / "configs").mkdir()
    recipe = write_recipe(
        ws / "configs",
        "../tiny",
        train={"max_steps": STEPS, "log_every": 1, "lr": 5e-3, "eval_every": 100},
        output={"dir": "runs/tiny"},
    )
    recipe.write_text(recipe.read_text().replace("data:\n", "data:\n  val_size: 2\n", 1))
    recipe.rename(ws / "configs" / "tiny.yaml")
    # a vision-language recipe: a tiny Qwen2-VL on rows with LLaMA-Factory's demo images
    from hwft.testing.tiny import build_tiny_vision_model
    from tests.conftest import PEER_DATA

    build_tiny_vision_model("qwen2_vl", ws / "tinyvl", tokenizer_dir)
    (ws / "vision").mkdir()
    rows = json.loads((PEER_DATA / "llamafactory" / "mllm_demo.json").read_text())[:2]
    for row in rows:
        row["images"] = [str(PEER_DATA / "llamafactory" / image) for image in row["images"]]
    vision = write_recipe(ws / "vision", "../tinyvl", train={"max_length": 512}, output={"dir": "runs/vision"})
    write_jsonl(ws / "vision" / "train.jsonl", rows)
    vision.write_text(vision.read_text().replace("path: train.jsonl", "path: ../vision/train.jsonl"))
    vision.rename(ws / "configs" / "vision.yaml")
    return ws


@pytest.fixture(scope="module")
def board(workspace):
    """``hwft board --port 0`` in the workspace; yields its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hwft", "board", "--port", "0", "--workspace", str(workspace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workspace,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = process.stderr.readline()
    found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
    assert found, line + process.stderr.read() if process.poll() is not None else line
    yield found.group(1)
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    why = browser_ready()
    if why:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 60, what: str = "the page"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # an element being re-rendered
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} ({last!r})")


def read(value, what: str = "the page"):
    """Read what the page may be re-rendering (the runs table redraws every 1.5 s): again on a
    stale element."""
    return wait_for(lambda: [value()], 10, what)[0]


def click(driver, css: str, what: str) -> None:
    """Click what the page may be re-rendering (the runs table redraws every 1.5 s): again on a
    stale element."""
    from selenium.webdriver.common.by import By

    wait_for(lambda: driver.find_element(By.CSS_SELECTOR, css).click() or True, 30, what)


def type_into(driver, css: str, text: str) -> None:
    """Replace a field's text as a user does (select all, type, Enter), again if the form was
    re-rendered meanwhile (clear() would send a change of its own, and the form redraws on it)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def attempt() -> bool:
        field = driver.find_element(By.CSS_SELECTOR, css)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(text + "\n")
        return True

    wait_for(attempt, 30, css)


def settled(driver) -> None:
    """Wait until the page has no request under way (it re-renders the form after each)."""
    wait_for(lambda: not driver.find_element("tag name", "body").get_attribute("data-busy"), 60, "the page to settle")


def shot(driver, name: str) -> None:
    folder = os.environ.get("HWFT_BOARD_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def test_build_run_watch_stop_resume_and_chat_in_a_browser(board, browser, workspace):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = browser
    find = d.find_element
    d.get(board + "/")
    # -- build: a recipe from configs/, edited in the form generated from the schema
    wait_for(
        lambda: "configs/tiny.yaml" in [o.text for o in Select(find(By.ID, "recipe-source")).options],
        what="the workspace's recipes",
    )
    Select(find(By.ID, "recipe-source")).select_by_visible_text("configs/tiny.yaml")
    find(By.ID, "load").click()
    wait_for(lambda: "../tiny" in find(By.ID, "recipe-yaml").get_attribute("value"), what="the loaded recipe")
    settled(d)
    assert find(By.ID, "recipe-path").get_attribute("value") == "configs/tiny-board.yaml"
    type_into(d, '[data-key="train.lr"] input', "0.004")
    wait_for(lambda: "lr: 0.004" in find(By.ID, "recipe-yaml").get_attribute("value"), what="the form's edit")
    settled(d)
    assert "is valid" in find(By.ID, "recipe-said").text
    help_text = find(By.CSS_SELECTOR, '[data-key="train.lr"] small').text
    assert "Peak learning rate" in help_text and "default: 0.0002" in help_text
    # -- a refused field: the cpu backend has no flash attention, so the option is disabled, with why
    Select(find(By.CSS_SELECTOR, '[data-key="backend"] select')).select_by_value('"cpu"')
    wait_for(
        lambda: (
            find(By.CSS_SELECTOR, '[data-key="kernels.attention"] option[value=\'"flash_attention_2"\']').get_attribute(
                "disabled"
            )
            is not None
        ),
        what="the refused attention option",
    )
    why = find(
        By.CSS_SELECTOR, '[data-key="kernels.attention"] .refused[data-option="flash_attention_2"]'
    ).get_attribute("textContent")
    assert (
        "backend 'cpu' cannot run this recipe: it cannot do kernels.attention 'flash_attention_2' "
        "(it has: auto, eager, sdpa)" in why
    )
    # forced in through the YAML: the CLI's own message, the field marked, and no run can start
    text = find(By.ID, "recipe-yaml").get_attribute("value")
    d.execute_script(
        "document.getElementById('recipe-yaml').value = arguments[0]",
        text + "kernels:\n  attention: flash_attention_2\n",
    )
    find(By.ID, "apply-yaml").click()
    wait_for(lambda: "hwft: error:" in find(By.ID, "recipe-said").text, what="the refusal")
    settled(d)
    assert "kernels.attention 'flash_attention_2'" in find(By.ID, "recipe-said").text
    assert "error" in find(By.CSS_SELECTOR, '[data-key="kernels.attention"]').get_attribute("class")
    assert not find(By.ID, "start").is_enabled()
    shot(d, "recipe")
    Select(find(By.CSS_SELECTOR, '[data-key="kernels.attention"] select')).select_by_value('"auto"')
    wait_for(lambda: find(By.ID, "start").is_enabled(), what="the recipe valid again")
    # -- the data as the model sees it
    find(By.CSS_SELECTOR, '#tabs [data-tab="data"]').click()
    find(By.ID, "preview").click()
    wait_for(lambda: find(By.CSS_SELECTOR, "#data-rows mark"), what="trained spans")
    assert "packing:" in find(By.ID, "packing").text
    shot(d, "data")
    # -- run it, stop it as soon as it steps (however fast this machine steps), resume it and
    # watch the chart grow
    find(By.CSS_SELECTOR, '#tabs [data-tab="recipe"]').click()
    find(By.ID, "start").click()
    row = '#runs-table tr[data-run="runs/tiny"]'
    wait_for(lambda: find(By.CSS_SELECTOR, row).get_attribute("data-state") == "running", 120, "the run to start")
    step = lambda: int((find(By.CSS_SELECTOR, f"{row} .step").text or "0/").split("/")[0] or 0)  # noqa: E731
    wait_for(lambda: step() >= 3, 120, "the first steps")
    assert read(lambda: find(By.CSS_SELECTOR, f"{row} .step").text, "the step").endswith(f"/{STEPS}")
    click(d, f'{row} button[data-action="stop"]', "Stop")
    wait_for(lambda: find(By.CSS_SELECTOR, row).get_attribute("data-state") == "stopped", 120, "the run to stop")
    stopped_at = read(step, "the step")
    assert 0 < stopped_at < STEPS
    wait_for(lambda: "stopped by SIGTERM" in find(By.ID, "run-log").text, 10, "the stop in the log")
    first_chart = find(By.ID, "run-chart").get_attribute("innerHTML")
    # -- resume it to the end: every step once
    click(d, f'{row} button[data-action="resume"]', "Resume")
    wait_for(lambda: step() > stopped_at + 2, 120, "the resumed run's steps")
    wait_for(lambda: find(By.ID, "run-chart").get_attribute("innerHTML") != first_chart, 10, "the chart to grow")
    shot(d, "runs")
    wait_for(lambda: find(By.CSS_SELECTOR, row).get_attribute("data-state") == "finished", 240, "the run to finish")
    steps = [json.loads(line)["step"] for line in (workspace / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert "resum" in find(By.ID, "run-log").text
    # -- side by side
    find(By.CSS_SELECTOR, '#tabs [data-tab="compare"]').click()
    click(d, '#compare-runs input[value="runs/tiny"]', "the run's checkbox")
    wait_for(lambda: "runs/tiny" in find(By.ID, "compare-chart").get_attribute("innerHTML"), 20, "the overlay")
    shot(d, "compare")
    # -- chat with the result, streamed
    find(By.CSS_SELECTOR, '#tabs [data-tab="use"]').click()
    wait_for(
        lambda: "runs/tiny" in [o.get_attribute("value") for o in Select(find(By.ID, "use-run")).options],
        what="the result",
    )
    find(By.ID, "chat-input").send_keys("What is your name?\n")
    wait_for(lambda: find(By.CSS_SELECTOR, '#chat-log .assistant[data-done="1"]'), 120, "the reply")
    assert find(By.CSS_SELECTOR, "#chat-log .user").text == "> What is your name?"
    assert find(By.CSS_SELECTOR, "#chat-log .assistant").text.strip()
    shot(d, "use")
    # -- export (reloaded and compared) and eval, base against fine-tuned, each a child process
    wait_for(lambda: find(By.CSS_SELECTOR, '#export-buttons button[data-export="peft"]'), what="the export buttons")
    click(d, '#export-buttons button[data-export="peft"]', "Export peft")
    wait_for(lambda: find(By.ID, "task-log").get_attribute("data-code") == "0", 120, "the export")
    assert '"ok": true' in find(By.ID, "task-log").text
    find(By.ID, "eval").click()
    wait_for(lambda: "$ hwft eval" in find(By.ID, "task-log").text, 10, "the eval to start")
    wait_for(lambda: find(By.ID, "task-log").get_attribute("data-code") == "0", 120, "the eval")
    assert re.search(r"\| metric \| base \| fine-tuned \|", find(By.ID, "task-log").text), find(By.ID, "task-log").text
    find(By.CSS_SELECTOR, '#tabs [data-tab="machine"]').click()
    # the page may redraw the table between finding it and reading it: read it inside the wait
    wait_for(
        lambda: "sft:" in find(By.CSS_SELECTOR, '#machine table[data-backend="cpu"]').text, what="the machine page"
    )
    shot(d, "machine")
    # -- a vision-language recipe's data: each row's images as pictures beside its text
    find(By.CSS_SELECTOR, '#tabs [data-tab="recipe"]').click()
    Select(find(By.ID, "recipe-source")).select_by_visible_text("configs/vision.yaml")
    find(By.ID, "load").click()
    wait_for(lambda: "../tinyvl" in find(By.ID, "recipe-yaml").get_attribute("value"), what="the vision recipe")
    settled(d)
    find(By.CSS_SELECTOR, '#tabs [data-tab="data"]').click()
    find(By.ID, "preview").click()
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#data-rows img.thumb")) == 3, 60, "the rows' pictures")
    drawn = d.execute_script(
        "return [...document.querySelectorAll('#data-rows img.thumb')].map(i => [i.complete, i.naturalWidth])"
    )
    assert all(done and 0 < width <= 96 for done, width in drawn), drawn  # mllm_demo's rows: 2 images, then 1
    assert "<|image_pad|>x" in find(By.CSS_SELECTOR, "#data-rows .row").text  # each image's tokens once, counted
    shot(d, "data-images")


# -- the server's guards and checks, in-process ------------------------------------------------

CHANGE = {"X-Hwft-Board": "1"}


@pytest.fixture()
def client(workspace, monkeypatch):
    """The app in this process, in its workspace as ``hwft board`` runs it (hwft.board.app.serve)."""
    from starlette.testclient import TestClient

    from hwft.board.app import make_app
    from hwft.board.workspace import Workspace

    monkeypatch.chdir(workspace)
    return TestClient(make_app(Workspace(workspace), max_upload=1024), base_url="http://127.0.0.1:7860")


def recipe_text(workspace) -> str:
    return (workspace / "configs" / "tiny.yaml").read_text()


def test_the_board_opens_on_the_quickstart(tmp_path):
    """In the repository the board opens on configs/quickstart.yaml (whose data is there), not on
    the first recipe by name (configs/bench.yaml); elsewhere on the first recipe listed."""
    from hwft.board.workspace import Workspace
    from tests.conftest import REPO

    repo = Workspace(REPO)
    recipes = repo.recipes()
    assert recipes[0] == "configs/bench.yaml" and repo.first_recipe(recipes) == "configs/quickstart.yaml"
    (tmp_path / "b.yaml").write_text("model: x\n")
    (tmp_path / "a.yaml").write_text("model: x\n")
    elsewhere = Workspace(tmp_path)
    assert elsewhere.first_recipe(elsewhere.recipes()) == "a.yaml"


def test_a_page_elsewhere_cannot_reach_the_board(client):
    assert client.get("/api/form").status_code == 200
    # DNS rebinding: a name that resolves to 127.0.0.1 but is not loopback's own
    assert client.get("/api/form", headers={"host": "attacker.example:7860"}).status_code == 421
    # a cross-site form post cannot set the change header
    said = client.post("/api/recipe/save", json={"path": "configs/x.yaml", "yaml": "model: x"})
    assert said.status_code == 403 and "x-hwft-board" in said.json()["error"]


def test_any_other_address_needs_the_token(workspace):
    from starlette.testclient import TestClient

    from hwft.board.app import make_app
    from hwft.board.workspace import Workspace

    client = TestClient(make_app(Workspace(workspace), host="0.0.0.0", token="s3cret"), base_url="http://10.0.0.5:7860")
    assert client.get("/api/form").status_code == 401
    assert client.get("/api/form", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/form", headers={"authorization": "Bearer s3cret"}).status_code == 200
    opened = client.get("/?token=s3cret")
    assert opened.status_code == 200 and "hwft_board_token=s3cret" in opened.headers["set-cookie"]
    assert client.get("/api/form").status_code == 200  # the cookie it set


def test_every_path_stays_inside_the_workspace(client, workspace, tmp_path):
    outside = tmp_path / "secret.yaml"
    outside.write_text("model: x\n")
    (workspace / "link.yaml").symlink_to(outside)
    for path in ("../secret.yaml", str(outside), "link.yaml"):
        said = client.get(f"/api/recipe/load?path={path}")
        assert said.status_code == 403 and "is outside the workspace" in said.json()["error"], path
    said = client.post("/api/recipe/save", headers=CHANGE, json={"path": "../x.yaml", "yaml": "model: x"})
    assert said.status_code == 403
    # a recipe's own paths too: data, output
    text = recipe_text(workspace).replace("runs/tiny", str(tmp_path / "out"))
    state = client.post("/api/recipe", headers=CHANGE, json={"yaml": text, "path": "configs/tiny.yaml"}).json()
    assert "output.dir" in state["error"] and "outside the workspace" in state["error"]
    said = client.post("/api/runs/start", headers=CHANGE, json={"yaml": text, "path": "configs/out.yaml"})
    assert said.status_code == 403 and not (tmp_path / "out").exists()


def test_uploads_have_a_size_limit(client, workspace):
    said = client.put("/api/upload?path=data/big.jsonl", headers=CHANGE, content=b"x" * 2048)
    assert said.status_code == 413 and "upload limit of 1024 bytes" in said.json()["error"]
    assert not (workspace / "data" / "big.jsonl").exists()
    said = client.put("/api/upload?path=data/small.jsonl", headers=CHANGE, content=b'{"text": "hi"}\n')
    assert said.status_code == 200 and (workspace / "data" / "small.jsonl").read_bytes() == b'{"text": "hi"}\n'
    again = client.put("/api/upload?path=data/small.jsonl", headers=CHANGE, content=b"{}")
    assert again.status_code == 400 and "exists" in again.json()["error"]
    assert client.put("/api/upload?path=../up.jsonl", headers=CHANGE, content=b"{}").status_code == 403


def test_the_form_is_the_schema_and_its_messages_are_the_cli_s(client, workspace, capsys):
    from hwft import cli
    from hwft.reference import markdown

    keys = {f["key"] for f in client.get("/api/form").json()["fields"]}
    documented = set(re.findall(r"^\| `([^`]+)` \|", markdown(), re.M))
    sections = {k.split("[]")[0] for k in documented} & {k.rsplit(".", 1)[0] for k in documented if "." in k}
    # every key of docs/recipe.md, the method sections' too (a list of sections is one YAML field)
    assert {k for k in documented if "[]" not in k and k not in sections} <= keys
    text = recipe_text(workspace)
    state = client.post(
        "/api/recipe",
        headers=CHANGE,
        json={"yaml": text, "path": "configs/tiny.yaml", "set": [{"key": "train.lr", "text": "fast"}]},
    ).json()
    assert cli.main(["train", str(workspace / "configs" / "tiny.yaml"), "train.lr=fast", "--dry-run"]) == 2
    assert state["error"] == capsys.readouterr().err.strip().replace(
        str(workspace / "configs" / "tiny.yaml"), "configs/tiny.yaml"
    )
    # a refused option carries what hwft train says of the recipe with it
    refused = client.post("/api/recipe", headers=CHANGE, json={"yaml": text, "path": "configs/tiny.yaml"}).json()
    assert refused["error"] is None
    said = refused["refusals"]["kernels.attention"]['"flash_attention_2"']
    assert said.startswith("backend 'cpu' cannot run this recipe: it cannot do kernels.attention 'flash_attention_2'")
    assert '"sdpa"' not in refused["refusals"]["kernels.attention"]
    assert (
        client.post(
            "/api/runs/start",
            headers=CHANGE,
            json={"yaml": text + "kernels: {attention: flash_attention_2}\n", "path": "configs/t.yaml"},
        ).status_code
        == 400
    )


def test_a_llamafactory_recipe_loads_as_the_hwft_recipe_it_becomes(client, workspace):
    import shutil

    import yaml

    from tests.conftest import PEER_DATA

    lf = PEER_DATA / "llamafactory"
    (workspace / "lf").mkdir(exist_ok=True)
    for name in ("dataset_info.json", "identity.json"):
        shutil.copy(lf / name, workspace / "lf" / name)
    raw = yaml.safe_load((lf / "examples" / "qwen3_lora_sft.yaml").read_text())
    raw.update(model_name_or_path=str(workspace / "tiny"), dataset_dir="lf", dataset="identity", output_dir="runs/lf")
    (workspace / "lf" / "qwen3_lora_sft.yaml").write_text(yaml.safe_dump(raw))
    state = client.get("/api/recipe/load?path=lf/qwen3_lora_sft.yaml").json()
    assert "note" in state, state
    assert state["note"].startswith("imported from LLaMA-Factory")
    assert state["raw"]["method"]["objective"] == "sft" and state["raw"]["method"]["tuning"] == "lora"


def test_no_shell_anywhere_in_the_board():
    for path in (REPO / "hwft" / "board").rglob("*.py"):
        text = path.read_text()
        for call in ("shell=True", "os.system(", "os.popen(", "create_subprocess_shell"):
            assert call not in text, (path, call)
