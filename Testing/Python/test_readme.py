"""Every example in the README's demo, command-line, Python, tracking and server sections runs as written."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("Try it in one minute", "Command line", "Python", "Tracking lesions into follow-ups", "Inference server")


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block in the tested sections, in README order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    out = []
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title = part.splitlines()[0]
        if title.startswith(SECTIONS):
            out += re.findall(r"```(bash|python)\n(.*?)```", part, flags=re.S)
    return out


def test_the_readme_has_the_examples():
    langs = [lang for lang, _ in readme_blocks()]
    assert langs.count("python") >= 2 and langs.count("bash") >= 4


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the README's server did not start")


def test_readme_examples_run_as_written(tmp_path):
    pytest.importorskip("fastapi")
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
               OMP_NUM_THREADS="2")
    background: list[subprocess.Popen] = []
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for lang, code in readme_blocks():
            if lang == "python":
                exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
                continue
            for line in code.splitlines():
                line = line.split("  #")[0].strip() if not line.lstrip().startswith("#") else ""
                if not line:
                    continue
                if line.endswith("&"):
                    cmd = line[:-1].strip()
                    port = int(re.search(r"--port (\d+)", cmd).group(1))
                    proc = subprocess.Popen(shlex.split(cmd), env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
                    background.append(proc)
                    _wait_for_port(port, proc)
                    continue
                r = subprocess.run(line, shell=True, env=env, capture_output=True, text=True, timeout=900)
                assert r.returncode == 0, f"README command failed: {line}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    finally:
        os.chdir(cwd)
        for proc in background:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert (tmp_path / "demo_out" / "overview.png").is_file()
    assert (tmp_path / "tracked" / "report.json").is_file() and (tmp_path / "tracked_report.csv").is_file()
    # the server gives what the local run gave
    local, remote = (tmp_path / "tracked" / "report.json"), (tmp_path / "tracked_remote" / "report.json")
    assert local.read_text() == remote.read_text()
