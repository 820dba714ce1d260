"""A classroom's path, end to end: the wheel ships the notebooks, ``python -m l4lab notebooks DIR`` copies
them into a student's folder without ever losing an edit, and the notebooks run live in JupyterLab.

The end-to-end test builds the wheel from a copy of the sources, installs it into a fresh virtual
environment (its third-party packages, torch included, come from this environment through a ``.pth``
line: nothing is downloaded), copies the notebooks with the installed command, and then runs notebook
00 with the installed l4lab as the kernel: in JupyterLab, in Chromium, when Playwright and chromium are
there (``test_tour_runs_live_in_jupyterlab``), otherwise headless with nbclient. One run of notebook
00 covers both, since it takes minutes.

In JupyterLab (started the way ``make lab`` starts it: this environment's ``jupyter lab``, here on a free
127.0.0.1 port with a token and a throw-away configuration), the test runs every cell of 00, checks that
every plotly figure is drawn and that each explorer answers a change of its first control with new
figure data in the page; then it runs every cell of 03 and checks its routing explorer the same way.
Any kernel error, browser console error, uncaught page error or request leaving 127.0.0.1 fails it.
Every process it starts is ended by it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from l4lab import __main__ as cli
from l4lab import classroom

ROOT = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip"]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "l4lab", "kernels", "notebooks", "benchmarks/results"]
TOUR = "00_tour.ipynb"
MOE = "03_mixture_of_experts.ipynb"
EXPLORER_CALL = "_explorer("  # routing_explorer(...), attention_explorer(...)
RUN_LIMIT_S = 1200  # one notebook's cells, live: 00 took 9.4 minutes on two cores busy with other work
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


# ---------------------------------------------------------------------- copying (fast)
@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small stand-in for the shipped notebooks, which a test can change like a new l4lab release."""
    root = tmp_path / "shipped"
    for name in ["00_tour.ipynb", "01_next.ipynb", "labs/lab1_x.ipynb", "labs/solutions/lab1_x.ipynb"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps({"name": name, "version": 1}))
    monkeypatch.setattr(classroom, "shipped_notebooks", lambda: root)
    return root


def actions(results: list[classroom.Copied]) -> dict[str, str]:
    return {r.path: r.action for r in results}


def test_the_repository_ships_every_notebook_and_keeps_solutions_apart() -> None:
    assert classroom.shipped_notebooks() == ROOT / "notebooks"
    students = classroom.notebook_files()
    teachers = classroom.notebook_files(solutions=True)
    chapters = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [p for p in students if "/" not in p] == chapters
    assert [p for p in students if p.startswith("labs/")] == sorted(
        f"labs/{p.name}" for p in (ROOT / "notebooks" / "labs").glob("lab*.ipynb")
    )
    assert not any("solutions" in p for p in students)
    assert teachers[: len(students)] == students
    assert teachers[len(students) :] == [f"labs/solutions/{Path(p).name}" for p in students if "labs/" in p]


def test_copy_adds_then_keeps_what_the_student_edited(shipped: Path, tmp_path: Path) -> None:
    folder = tmp_path / "student"
    first = classroom.copy_notebooks(folder)
    assert actions(first) == {
        "00_tour.ipynb": "added",
        "01_next.ipynb": "added",
        "labs/lab1_x.ipynb": "added",
    }
    assert not (folder / "labs" / "solutions").exists()  # solutions only when asked for
    assert (folder / "00_tour.ipynb").read_bytes() == (shipped / "00_tour.ipynb").read_bytes()
    assert set(actions(classroom.copy_notebooks(folder)).values()) == {"unchanged"}

    edited = folder / "labs" / "lab1_x.ipynb"
    edited.write_text("my answers")
    for name in ["00_tour.ipynb", "labs/lab1_x.ipynb"]:  # a new release changes two notebooks
        (shipped / name).write_text(json.dumps({"name": name, "version": 2}))
    second = classroom.copy_notebooks(folder)
    assert actions(second) == {
        "00_tour.ipynb": "updated",  # not edited since it was copied: the new version replaces it
        "01_next.ipynb": "unchanged",
        "labs/lab1_x.ipynb": "kept",
    }
    assert json.loads((folder / "00_tour.ipynb").read_text())["version"] == 2
    assert edited.read_text() == "my answers"
    assert "you edited it" in classroom.describe(second, folder)
    assert actions(classroom.copy_notebooks(folder))["labs/lab1_x.ipynb"] == "kept"  # and again

    replaced = classroom.copy_notebooks(folder, overwrite=True)
    assert actions(replaced)["labs/lab1_x.ipynb"] == "replaced"
    assert [r.backup for r in replaced if r.backup] == ["labs/lab1_x.ipynb.bak"]
    assert (folder / "labs" / "lab1_x.ipynb.bak").read_text() == "my answers"
    assert json.loads(edited.read_text())["version"] == 2

    edited.write_text("second attempt")
    classroom.copy_notebooks(folder, overwrite=True)
    assert (folder / "labs" / "lab1_x.ipynb.bak2").read_text() == "second attempt"
    assert (folder / "labs" / "lab1_x.ipynb.bak").read_text() == "my answers"


def test_a_file_the_student_made_under_a_notebooks_name_is_kept(shipped: Path, tmp_path: Path) -> None:
    folder = tmp_path / "student"
    (folder / "labs").mkdir(parents=True)
    (folder / "labs" / "lab1_x.ipynb").write_text("written before any copy")
    assert actions(classroom.copy_notebooks(folder))["labs/lab1_x.ipynb"] == "kept"
    assert (folder / "labs" / "lab1_x.ipynb").read_text() == "written before any copy"


def test_solutions_on_request(shipped: Path, tmp_path: Path) -> None:
    results = classroom.copy_notebooks(tmp_path / "teacher", solutions=True)
    assert actions(results)["labs/solutions/lab1_x.ipynb"] == "added"


def test_the_command_copies_and_refuses_a_file(
    shipped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["notebooks", str(tmp_path / "mine")]) == 0
    out = capsys.readouterr().out
    assert "added      labs/lab1_x.ipynb" in out and "3 added" in out and "jupyter lab" in out
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["notebooks", str(tmp_path / "a_file")])
    assert stopped.value.code == 1
    assert "is a file, not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------- the wheel, installed
def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=300, **kwargs)


def clean_environment() -> dict[str, str]:
    """This environment without PYTHONPATH, so that the fresh one imports its own installed l4lab (its
    commands also run outside the clone: Python puts the working directory on the path)."""
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}


class Installed:
    """l4lab built as a wheel, installed into a fresh virtual environment, its notebooks copied."""

    def __init__(self, base: Path) -> None:
        sources = base / "sources"
        sources.mkdir()
        for name in SOURCES:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(
                    source,
                    sources / name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", "runs"),
                )
            else:
                shutil.copy2(source, sources / name)
        self.build = run(
            [
                *PIP,
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-w",
                str(base / "dist"),
                str(sources),
            ],
            env=clean_environment(),
        )
        self.wheel = next((base / "dist").glob("l4lab-*.whl"))
        self.venv = base / "venv"
        run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)])
        self.python = self.venv / "bin" / "python"
        run(
            [
                *PIP,
                "--python",
                str(self.python),
                "install",
                "--no-deps",
                "--no-index",
                "--quiet",
                str(self.wheel),
            ],
            env=clean_environment(),
        )
        site = self.run("-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
        # torch, plotly, ipykernel...: this environment's, found after the fresh one's own packages
        Path(site.stdout.strip(), "outer-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
        self.students = base / "student"
        self.copy = self.run("-m", "l4lab", "notebooks", str(self.students))

    def run(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """The fresh environment's Python with ``arguments``, run in a folder outside the clone."""
        return run([str(self.python), *arguments], env=clean_environment(), cwd=self.venv)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return Installed(tmp_path_factory.mktemp("classroom"))


def test_the_wheel_installs_with_its_notebooks_and_metadata(installed: Installed) -> None:
    build_log = installed.build.stdout + installed.build.stderr
    assert "Warning" not in build_log, build_log  # setuptools warns about licence tables, missing packages
    where = installed.run("-c", "import l4lab; print(l4lab.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(installed.venv)
    metadata = installed.run("-c", "from importlib.metadata import metadata; print(metadata('l4lab'))").stdout
    assert "License-Expression: MIT" in metadata and "Classifier: Intended Audience :: Education" in metadata
    assert "Project-URL: Llama 4 model card, https://github.com/meta-llama/llama-models/" in metadata
    copied = sorted(p.relative_to(installed.students).as_posix() for p in installed.students.rglob("*.ipynb"))
    assert copied == sorted(classroom.notebook_files())  # what the clone ships, and no solution
    for name in copied:
        assert (installed.students / name).read_bytes() == (ROOT / "notebooks" / name).read_bytes(), name
    assert "jupyter lab" in installed.copy.stdout


def test_the_wheel_ships_the_committed_results_the_notebooks_read(installed: Installed) -> None:
    """03, 04, 07, 08 and 09 draw results of longer runs (l4lab.measured): the installed wheel has its own."""
    listing = installed.run(
        "-c",
        "from l4lab.measured import results_folder as f; "
        "print(f()); print(*sorted(p.name for p in f().iterdir()))",
    ).stdout.splitlines()
    assert Path(listing[0]).is_relative_to(installed.venv), listing[0]
    committed = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.*"))
    assert listing[1].split() == committed
    herd = installed.run(
        "-c", "from l4lab.measured import committed_results as c; import json; print(json.dumps(c('herd')))"
    )
    assert json.loads(herd.stdout) == json.loads((ROOT / "benchmarks/results/herd.json").read_text())


def browser_missing() -> str | None:
    """Why the live test cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[dev]')"
    if shutil.which("chromium") is None:
        return "no chromium on the PATH (Debian: apt-get install chromium; make test does it as root)"
    return None


def test_tour_executes_in_the_installed_wheel(installed: Installed) -> None:
    """Without a browser, notebook 00 still runs in the fresh install (with one, the live test runs it)."""
    if browser_missing() is None:
        pytest.skip("notebook 00 runs in the installed wheel live in JupyterLab: test_tour_runs_live_*")
    # nbconvert run by the fresh environment's Python starts that Python as the notebook's kernel
    command = [str(installed.python), "-m", "nbconvert", "--to", "notebook", "--execute", "--output"]
    command += ["executed.ipynb", f"--ExecutePreprocessor.timeout={RUN_LIMIT_S}", TOUR]
    subprocess.run(command, cwd=installed.students, env=clean_environment(), check=True, timeout=RUN_LIMIT_S)


# ---------------------------------------------------------------------- live in JupyterLab
def install_kernel(jupyter_path: Path, python: Path) -> None:
    """A "python3" kernel that is ``python`` (the fresh environment's), found first on ``jupyter_path``."""
    spec = jupyter_path / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (l4lab wheel)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Lab:
    """``jupyter lab`` from this environment on 127.0.0.1, serving ``root``, with a throw-away
    configuration and the installed wheel's Python as the "python3" kernel."""

    def __init__(self, root: Path, base: Path, python: Path) -> None:
        install_kernel(base / "share", python)
        settings = {
            # every cell in the page (no virtual scrolling), so that the test can read them all
            "notebook-extension/tracker": {"windowingMode": "none"},
            "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        }
        for name, values in settings.items():
            path = base / "settings" / "@jupyterlab" / f"{name}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime = str(base / "runtime")
        env = clean_environment() | {
            "HOME": str(base / "home"),
            "JUPYTER_CONFIG_DIR": str(base / "config"),
            "JUPYTER_DATA_DIR": str(base / "data"),
            "JUPYTER_RUNTIME_DIR": self.runtime,
            "JUPYTER_PATH": str(base / "share"),
            "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
        }
        jupyter = Path(sys.executable).parent / "jupyter"  # as `make lab`: $(VENV)/bin/jupyter lab
        command = [str(jupyter), "lab", str(root), "--no-browser", "--ServerApp.ip=127.0.0.1"]
        command += [f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0"]
        command += [f"--IdentityProvider.token={self.token}", "--LabApp.news_url=None"]
        # nothing that would ask the network: no news, no update check, no extension index, no terminal
        command += ["--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        command += ["--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False"]
        if os.geteuid() == 0:  # containers and CI run as root
            command.append("--allow-root")
        (base / "home").mkdir()
        self.log = (base / "jupyterlab.log").open("w")
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2).read()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"JupyterLab did not start: see {self.log.name}") from None
                time.sleep(0.5)

    def close(self) -> None:
        """Shut the server down with its kernels, then end whatever of them is left, by process id: the
        server's process group, and the kernels (each in a session of its own) found by their connection
        files in this server's runtime folder."""
        try:
            request = urllib.request.Request(f"{self.url}/api/shutdown?token={self.token}", method="POST")
            urllib.request.urlopen(request, timeout=10).read()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for pid in [self.process.pid, *self.kernels()]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL) if pid == self.process.pid else os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()

    def kernels(self) -> list[int]:
        """The ids of live processes whose command line names this server's runtime folder."""
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                command = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if self.runtime in command:
                found.append(int(entry.name))
        return found


class Watched:
    """A browser page with everything that went wrong on it: console errors, uncaught errors, requests
    that leave the server."""

    def __init__(self, context: object, base: str) -> None:
        self.base = base
        self.problems: list[str] = []
        page = context.new_page()  # type: ignore[attr-defined]
        self.page = page
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        page.on("request", self._request)

    def _request(self, request: object) -> None:
        url = request.url  # type: ignore[attr-defined]
        if urlsplit(url).scheme not in ("data", "blob", "about") and not url.startswith(self.base):
            self.problems.append(f"request leaving 127.0.0.1: {url}")


STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
CELL_STATE = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell')).map(cell => ({
    prompt: (cell.querySelector('.jp-InputPrompt') || {}).textContent || '',
    error: Array.from(cell.querySelectorAll('STDERR'))
        .map(o => o.textContent).filter(t => /Traceback|Error/.test(t)).join('\\n'),
}))""".replace("STDERR", STDERR)
KERNEL_IDLE = """() => {
    const name = ((document.querySelector('.jp-KernelName') || {}).textContent || '').trim();
    const indicator = document.querySelector('.jp-Notebook-ExecutionIndicator');
    return name !== '' && name !== 'No Kernel' && !!indicator && indicator.dataset.status === 'idle';
}"""
CONTROL_WAIT_S = 120
# what each output of a cell is drawn as: a widget (the live explorer) or a static renderer (a fallback)
OUTPUT_KINDS = """cell => Array.from(cell.querySelectorAll('.jp-Cell-outputArea > .jp-OutputArea-child'))
    .map(o => o.querySelector('.jupyter-widgets') ? 'widget' : o.innerText.slice(0, 200) || o.className)"""
FIGURE_DATA = """cell => Array.from(cell.querySelectorAll('.js-plotly-plot'))
    .map(g => JSON.stringify((g.data || []).map(t => [t.x, t.y, t.z, t.text])))"""


def open_notebook(watched: Watched, lab: Lab, name: str) -> object:
    """``name`` alone in a workspace of its own: the default workspace would reopen the notebooks of the
    tests before, and every selector here (cells, prompts, figures, the kernel's state) reads the page."""
    page = watched.page
    workspace = Path(name).stem
    url = f"{lab.url}/lab/workspaces/{workspace}/tree/{name}?token={lab.token}"
    page.goto(url, wait_until="load")  # type: ignore[attr-defined]
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)  # type: ignore[attr-defined]
    page.wait_for_function(KERNEL_IDLE, timeout=120_000)  # type: ignore[attr-defined]
    open_notebooks = page.evaluate("() => document.querySelectorAll('.jp-Notebook').length")  # type: ignore[attr-defined]
    assert open_notebooks == 1, f"{name}: {open_notebooks} notebooks open in the page, not only this one"
    return page


def menu(page: object, top: str, item: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=top).first.click()  # type: ignore[attr-defined]
    page.locator(".lm-Menu-itemLabel", has_text=item).first.click()  # type: ignore[attr-defined]


def prompts(page: object) -> list[str]:
    state = page.evaluate(CELL_STATE)  # type: ignore[attr-defined]
    errors = [f"cell {i}: {c['error'][-2000:]}" for i, c in enumerate(state) if c["error"]]
    assert not errors, "a cell failed\n" + "\n".join(errors)
    return [c["prompt"].strip("[]: ") for c in state]


def wait_until_run(page: object, cells: int, name: str) -> None:
    """Until code cells 0 .. ``cells`` - 1 ran (a number in each prompt) and the kernel is idle; fails at
    once on a cell with an error, and when the queue empties before every cell ran."""
    deadline = time.monotonic() + RUN_LIMIT_S
    idle_and_unfinished = 0
    while True:
        state = prompts(page)
        left = [i for i, prompt in enumerate(state[:cells]) if not prompt.isdigit()]
        idle = "*" not in state and page.evaluate(KERNEL_IDLE)  # type: ignore[attr-defined]
        if idle and not left:
            return
        idle_and_unfinished = idle_and_unfinished + 1 if idle else 0
        assert idle_and_unfinished < 10, f"{name}: the run stopped before cells {left}"
        assert time.monotonic() < deadline, f"{name}: not done after {RUN_LIMIT_S} s (cells {left} left)"
        time.sleep(1)


def expected_figures(notebook: dict, cells: list[int]) -> int:
    """The plotly figures the stored outputs of these code cells show (an explorer: each of its panels)."""
    count = 0
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    for index in cells:
        for output in code[index].get("outputs", []):
            data = output.get("data", {})
            if "application/vnd.l4lab.figures+json" in data:
                count += len(data["application/vnd.l4lab.figures+json"]["figures"])
            elif "application/vnd.plotly.v1+json" in data:
                count += 1
    return count


def check_figures_and_explorers(page: object, notebook: dict, cells: int, name: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"][:cells]
    drawn = page.evaluate(  # type: ignore[attr-defined]
        "() => Array.from(document.querySelectorAll('.jp-Notebook .js-plotly-plot'))"
        ".map(g => !!g.querySelector('.main-svg'))"
    )
    assert all(drawn), f"{name}: {drawn.count(False)} plotly figures left undrawn"
    assert len(drawn) >= expected_figures(notebook, list(range(cells))), f"{name}: figures missing"
    explorers = [i for i, cell in enumerate(code) if EXPLORER_CALL in "".join(cell["source"])]
    assert explorers, f"{name} has no explorer"
    for index in explorers:
        cell = page.locator(".jp-Notebook .jp-CodeCell").nth(index)  # type: ignore[attr-defined]
        cell.evaluate("e => e.scrollIntoView({block: 'center'})")  # rendered, so its controls are visible
        control = cell.locator(".widget-dropdown select, .widget-toggle-buttons button").first
        try:  # the widget view can land after the prompt's number: wait for it, then say what is shown
            control.wait_for(state="attached", timeout=CONTROL_WAIT_S * 1000)
        except PlaywrightTimeout as error:
            shown = cell.evaluate(OUTPUT_KINDS)
            raise AssertionError(
                f"{name} cell {index}: no explorer control after {CONTROL_WAIT_S} s; outputs shown: {shown}"
            ) from error
        before = cell.evaluate(FIGURE_DATA)
        assert before, f"{name} cell {index}: the explorer shows no figure"
        if control.evaluate("e => e.tagName") == "SELECT":
            options = control.evaluate("e => Array.from(e.options).map(o => o.value)")
            current = control.evaluate("e => e.value")
            control.select_option(next(value for value in options if value != current))
        else:
            cell.locator(".widget-toggle-buttons button:not(.mod-active)").first.click()
        deadline = time.monotonic() + 120
        while cell.evaluate(FIGURE_DATA) == before:
            assert time.monotonic() < deadline, f"{name} cell {index}: the figure did not change"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    reason = browser_missing()
    if reason is not None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def lab(installed: Installed, browser: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab serving the student's copies, with the installed wheel as the kernel."""
    server = Lab(installed.students, tmp_path_factory.mktemp("jupyterlab"), installed.python)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def watched(browser: object, lab: Lab) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    try:
        yield Watched(context, lab.url)
    finally:
        context.close()  # type: ignore[attr-defined]


def test_tour_runs_live_in_jupyterlab(installed: Installed, lab: Lab, watched: Watched) -> None:
    """Every cell of 00 (the installed wheel's kernel), every figure drawn, every explorer answering."""
    tour = json.loads((installed.students / TOUR).read_text())
    cells = sum(cell["cell_type"] == "code" for cell in tour["cells"])
    page = open_notebook(watched, lab, TOUR)
    menu(page, "Run", "Run All Cells")
    wait_until_run(page, cells, TOUR)
    check_figures_and_explorers(page, tour, cells, TOUR)
    assert watched.problems == [], f"{TOUR}: " + "\n".join(watched.problems)


def test_routing_explorer_of_03_runs_live_in_jupyterlab(
    installed: Installed, lab: Lab, watched: Watched
) -> None:
    """Every cell of 03, every figure drawn, its routing explorer answering a change of MoE layer.

    The whole notebook runs ("Run All Cells", as for 00): running only the cells above the explorer
    depends on where JupyterLab leaves the selection and on which cells it has rendered, and was flaky."""
    moe = json.loads((installed.students / MOE).read_text())
    code = [cell for cell in moe["cells"] if cell["cell_type"] == "code"]
    assert any("routing_explorer(" in "".join(c["source"]) for c in code), f"{MOE} has no routing explorer"
    page = open_notebook(watched, lab, MOE)
    menu(page, "Run", "Run All Cells")
    wait_until_run(page, len(code), MOE)
    check_figures_and_explorers(page, moe, len(code), MOE)
    assert watched.problems == [], f"{MOE}: " + "\n".join(watched.problems)
