"""The README's commands, run as written: `make serve`, then every curl example with its answer."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import requests

from conftest import ROOT, free_port

pytestmark = pytest.mark.e2e


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a command started in its own process group (make, gunicorn and its workers)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def readme_examples() -> list[tuple[str, str]]:
    """(command, expected output) for each `$ curl …` line in the README's console blocks."""
    text = (ROOT / "README.md").read_text()
    examples = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                out = []
                for nxt in lines[i + 1:]:
                    if nxt.startswith("$ "):
                        break
                    out.append(nxt)
                examples.append((line[2:], "\n".join(out)))
    return examples


def test_readme_has_curl_examples():
    cmds = [c for c, _ in readme_examples()]
    assert len(cmds) >= 6 and all(c.startswith("curl ") for c in cmds)
    assert any(":predict" in c for c in cmds) and any(":regress" in c for c in cmds)


@pytest.fixture(scope="module")
def make_serve(tmp_path_factory):
    """`make serve` exactly as the README says, on a free port."""
    port, grpc_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("make-serve") / "make-serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFWSGI_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["make", "serve", f"PORT={port}", f"GRPC_PORT={grpc_port}"], cwd=ROOT,
                                env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        workers = os.cpu_count() or 1
        deadline = time.monotonic() + 300
        while True:
            text = log_path.read_text(errors="replace")
            if len(re.findall(r"tfwsgi: worker \d+ ready", text)) >= workers:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"make serve did not come up:\n{text[-4000:]}")
            time.sleep(0.3)
        assert requests.get(f"http://127.0.0.1:{port}/v1/models/half_plus_two", timeout=10).ok
        serving = set(re.findall(rf"tfwsgi: worker (\d+) serves gRPC on port {grpc_port}\b", text))
        assert len(serving) >= workers, text[-4000:]  # and gRPC, on GRPC_PORT
        yield port, grpc_port
        # A clean start on a CPU-only machine (issue 18): no CUDA lines in make serve's log.
        if not os.path.exists("/proc/driver/nvidia"):
            cuda = [line for line in log_path.read_text(errors="replace").splitlines()
                    if re.search(r"cuda|cuinit|cudart", line, re.IGNORECASE)]
            assert not cuda, cuda
    finally:
        stop_group(proc)


@pytest.mark.parametrize(("command", "expected"), readme_examples(), ids=lambda v: v[:60])
def test_readme_curl_example(make_serve, command, expected):
    command = command.replace("localhost:8501", f"127.0.0.1:{make_serve[0]}")
    assert shlex.split(command)[0] == "curl"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    try:
        want = json.loads(expected)
    except ValueError:  # not JSON: the exact text (headers end in CRLF)
        assert out.stdout.replace("\r\n", "\n").strip() == expected.strip()
    else:
        assert json.loads(out.stdout) == want


def test_readme_grpc_client_example(make_serve):
    """The README's Python gRPC client, run as written against `make serve`'s gRPC port; it
    prints what its last line's comment says."""
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "PredictionServiceStub" in b]
    assert "localhost:8500" in block and "make serve GRPC_PORT=" in text
    expected = block.rstrip().splitlines()[-1].split("# ", 1)[1]
    code = block.replace("localhost:8500", f"127.0.0.1:{make_serve[1]}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == expected


def test_readme_drop_in_command_serves_the_demo_model(make_serve, tmp_path):
    """The README's `tfwsgi-model-server …` block, run as written (after `make serve` built the
    demo model), on free ports; then the README's first predict example against it."""
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "tfwsgi-model-server" in b]
    port = free_port()
    command = block.replace("--rest_api_port=8501", f"--rest_api_port={port}")
    command = command.replace("--port=8500", f"--port={free_port()}")  # gRPC's, once it is served
    assert command != block, "the block no longer names --rest_api_port=8501"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFWSGI_")}
    log_path = tmp_path / "drop-in.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1/models/half_plus_two:predict"
        deadline = time.monotonic() + 300
        while True:
            try:
                r = requests.post(url, json={"instances": [1.0, 2.0, 5.0]}, timeout=10)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log_path.read_text(errors="replace")[-4000:]) from None
                time.sleep(0.3)
        assert r.json() == {"predictions": [2.5, 3.0, 4.5]}
    finally:
        stop_group(proc)
