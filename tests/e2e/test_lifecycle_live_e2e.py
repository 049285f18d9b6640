"""Live model lifecycle under continuous load: new versions, removals, labels, config edits, SIGHUP."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e

# tests/models.py builds hp/N as y = 0.5·x + b with b = 2, 3, 4 for N = 1, 2, 3.
ANSWER = {1: 2.5, 2: 3.5, 3: 4.5}


def install(src: Path, base: Path, version: int) -> None:
    """Publish a version the safe way: copy beside the base path, then rename into it."""
    tmp = base.parent / f".incoming-{base.name}-{version}"
    shutil.copytree(src, tmp)
    os.rename(tmp, base / str(version))


class Load:
    """Clients that keep asking one URL and record (time, status, answer)."""

    def __init__(self, url: str, clients: int = 4, body: dict | None = None) -> None:
        self.url = url
        self.body = body or {"instances": [1.0]}
        self.results: list[tuple[float, int, object]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        with requests.Session() as s:
            while not self._stop.is_set():
                try:
                    r = s.post(self.url, json=self.body, headers={"Cache-Control": "no-store"}, timeout=30)
                    answer = r.json().get("predictions", [None])[0] if r.status_code == 200 else r.text
                    self.results.append((time.monotonic(), r.status_code, answer))
                except requests.RequestException as exc:
                    self.results.append((time.monotonic(), 0, str(exc)))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def failures(self) -> Counter:
        return Counter(code for _, code, _ in self.results if code != 200)

    def first_time_answering(self, answer: object, after: float = 0.0) -> float | None:
        for t, code, a in self.results:
            if t >= after and code == 200 and a == answer:
                return t
        return None

    def wait_for(self, answer: object, since: float, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.first_time_answering(answer, since)
            if t is not None:
                return t
            time.sleep(0.1)
        raise AssertionError(f"never answered {answer}: {self.results[-3:]}")


def until_every_worker(probe, expected: int, timeout: float = 30, in_a_row: int = 12) -> None:
    """Wait until ``probe()`` gives ``expected`` many times in a row (so from every worker)."""
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < in_a_row:
        assert time.monotonic() < deadline, f"not {expected} from every worker in {timeout}s"
        streak = streak + 1 if probe() == expected else 0
        time.sleep(0.05)


@pytest.fixture
def hp_base(tmp_path: Path, model_root: Path) -> Path:
    base = tmp_path / "hp"
    base.mkdir()
    install(model_root / "hp" / "1", base, 1)
    return base


def test_new_version_then_removal_under_load(start_server, model_root, hp_base):
    srv = start_server({"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(hp_base)})
    srv.wait_ready()
    with Load(srv.url + "/v1/models/hp:predict") as load:
        time.sleep(1)
        added = time.monotonic()
        install(model_root / "hp" / "2", hp_base, 2)
        switched = load.wait_for(ANSWER[2], added)
        # Both workers switch: wait until every answer is version 2's.
        time.sleep(3)
        shutil.rmtree(hp_base / "1")
        time.sleep(3)
    assert load.failures() == Counter(), load.failures()
    late = [a for t, _, a in load.results if t > switched + 3]
    assert late and set(late) == {ANSWER[2]}
    # TF Serving's bound: two poll intervals (1 s) plus the load time.
    load_time = max(float(x) for x in _load_times(srv.log(), 2))
    assert switched - added <= 2 * 1.0 + load_time + 1.0, (switched - added, load_time)
    status = srv.get("/v1/models/hp").json()["model_version_status"]
    assert [(s["version"], s["state"]) for s in status] == [("2", "AVAILABLE"), ("1", "END")]


def _load_times(log: str, version: int) -> list[str]:
    import re

    return re.findall(rf"loaded model hp version {version} in ([\d.]+)s", log)


def test_corrupt_versions_are_reported_and_never_served(start_server, model_root, hp_base):
    srv = start_server({"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(hp_base),
                        "TFWSGI_LOAD_RETRY_INTERVAL_MICROS": "500000",
                        "TFWSGI_MAX_NUM_LOAD_RETRIES": "2"})
    srv.wait_ready()
    with Load(srv.url + "/v1/models/hp:predict") as load:
        # Version 2: variables truncated. Version 3: no saved_model.pb at all.
        tmp = hp_base.parent / "v2"
        shutil.copytree(model_root / "hp" / "2", tmp)
        data = next((tmp / "variables").glob("variables.data-*"))
        data.write_bytes(data.read_bytes()[:10])
        os.rename(tmp, hp_base / "2")
        time.sleep(4)
        tmp = hp_base.parent / "v3"
        shutil.copytree(model_root / "hp" / "3", tmp)
        (tmp / "saved_model.pb").unlink()
        os.rename(tmp, hp_base / "3")
        time.sleep(4)
        # Fresh workers (a reload, a respawn) see only broken aspired versions: they fall back.
        srv.rotate()
        time.sleep(1)
    assert load.failures() == Counter()
    assert {a for _, _, a in load.results} == {ANSWER[1]}
    status = {s["version"]: s for s in srv.get("/v1/models/hp").json()["model_version_status"]}
    assert status["1"]["state"] == "AVAILABLE"
    for v in ("2", "3"):
        assert status[v]["state"] == "END" and status[v]["status"]["error_code"] != "OK", status[v]
    assert "SavedModel file does not exist" in status["3"]["status"]["error_message"]
    log = srv.log()
    assert "no retries left" in log


def test_labels_and_models_follow_the_config_file(start_server, model_root, tmp_path):
    config = tmp_path / "models.config"

    def write(labels: str, with_keras: bool) -> None:
        keras = f'config {{ name: "keras" base_path: "{model_root}/keras" }}' if with_keras else ""
        text = (f'model_config_list {{ config {{ name: "hp" base_path: "{model_root}/hp" '
                f'model_version_policy {{ all {{}} }} {labels} }} {keras} }}')
        tmp = config.with_suffix(".tmp")
        tmp.write_text(text)
        os.rename(tmp, config)

    write('version_labels { key: "stable" value: 1 }', with_keras=False)
    srv = start_server({"TFWSGI_MODEL_CONFIG_FILE": str(config),
                        "TFWSGI_MODEL_CONFIG_FILE_POLL_WAIT_SECONDS": "1"})
    srv.wait_ready()
    with Load(srv.url + "/v1/models/hp/labels/stable:predict") as load:
        time.sleep(1)
        moved = time.monotonic()
        write('version_labels { key: "stable" value: 3 }', with_keras=True)
        load.wait_for(ANSWER[3], moved, timeout=30)

        def keras_code() -> int:
            return srv.post("/v1/models/keras:predict", json={"instances": [[1, 2, 3, 4]]}).status_code

        until_every_worker(keras_code, 200)
        write('version_labels { key: "stable" value: 3 }', with_keras=False)
        until_every_worker(keras_code, 404)
    late = [a for _, _, a in load.results[-20:]]  # by now both workers have moved the label
    assert len(late) == 20 and set(late) == {ANSWER[3]}
    assert load.failures() == Counter()


def test_sighup_reloads_without_failed_requests(start_server, model_root, hp_base):
    srv = start_server({"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(hp_base)})
    srv.wait_ready()
    before = srv.worker_pids()
    with Load(srv.url + "/v1/models/hp:predict") as load:
        time.sleep(1)
        srv.rotate()
        time.sleep(1)
    assert not srv.worker_pids() & before, "workers were not replaced"
    assert load.failures() == Counter(), load.failures()
    assert {a for _, _, a in load.results} == {ANSWER[1]}


def test_readiness_tracks_the_models(start_server, model_root, tmp_path):
    base = tmp_path / "empty"
    base.mkdir()
    srv = start_server({"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(base)}, workers=1)
    srv.wait_ready()
    assert srv.get("/v2/health/live").status_code == 200
    r = srv.get("/v2/health/ready")
    assert r.status_code == 503 and r.json() == {"ready": False, "models": {"hp": False}}
    install(model_root / "hp" / "1", base, 1)
    deadline = time.monotonic() + 30
    while srv.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert srv.get("/v2/health/ready").json() == {"ready": True, "models": {"hp": True}}


def write_warmup(version_dir: Path, signature: str, records: int = 3) -> None:
    """assets.extra/tf_serving_warmup_requests as TF Serving reads it: TFRecord of PredictionLog."""
    import tensorflow as tf
    from tensorflow_serving.apis import (
        classification_pb2,
        predict_pb2,
        prediction_log_pb2,
        regression_pb2,
    )

    (version_dir / "assets.extra").mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(version_dir / "assets.extra" / "tf_serving_warmup_requests")) as w:
        for i in range(records):
            req = predict_pb2.PredictRequest()
            req.model_spec.signature_name = signature
            req.inputs["x"].CopyFrom(tf.make_tensor_proto([float(i)], dtype=tf.float32))
            w.write(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=req)).SerializeToString())
        example = tf.train.Example(features=tf.train.Features(
            feature={"x": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))}))
        creq = classification_pb2.ClassificationRequest()
        creq.model_spec.signature_name = "classify_x_to_y"
        creq.input.example_list.examples.append(example)
        w.write(prediction_log_pb2.PredictionLog(
            classify_log=prediction_log_pb2.ClassifyLog(request=creq)).SerializeToString())
        rreq = regression_pb2.RegressionRequest()
        rreq.model_spec.signature_name = "regress_x_to_y"
        rreq.input.example_list.examples.append(example)
        w.write(prediction_log_pb2.PredictionLog(
            regress_log=prediction_log_pb2.RegressLog(request=rreq)).SerializeToString())


def test_warmup_runs_before_a_version_is_available(start_server, model_root, tmp_path):
    base = tmp_path / "hp"
    base.mkdir()
    good = tmp_path / "good"
    shutil.copytree(model_root / "hp" / "1", good)
    write_warmup(good, "serving_default")
    os.rename(good, base / "1")
    srv = start_server({"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(base),
                        "TFWSGI_LOAD_RETRY_INTERVAL_MICROS": "100000",
                        "TFWSGI_MAX_NUM_LOAD_RETRIES": "1"}, workers=1)
    srv.wait_ready()
    assert "warmed up model hp version 1 with 5 records" in srv.log()
    # A version whose warmup fails is not loaded: TF Serving fails the load.
    bad = tmp_path / "bad"
    shutil.copytree(model_root / "hp" / "2", bad)
    write_warmup(bad, "no_such_signature")
    with Load(srv.url + "/v1/models/hp:predict") as load:
        os.rename(bad, base / "2")
        deadline = time.monotonic() + 30
        while "failed to load model hp version 2 (no retries left)" not in srv.log():
            assert time.monotonic() < deadline, srv.log()[-2000:]
            time.sleep(0.2)
    assert load.failures() == Counter() and {a for _, _, a in load.results} == {ANSWER[1]}
    state = srv.get("/v1/models/hp/versions/2").json()["model_version_status"][0]
    assert state["state"] == "END" and "Warmup" in state["status"]["error_message"]
    assert "no_such_signature" in state["status"]["error_message"]


def test_sighup_rereads_the_env_file(start_server, model_root, tmp_path):
    env_file = tmp_path / "tfwsgi.env"
    env_file.write_text(f"# as /etc/tfwsgi/tfwsgi.env\nTFWSGI_MODEL_NAME=hp\n"
                        f"TFWSGI_MODEL_BASE_PATH='{model_root}/hp'\n"
                        "TFWSGI_FILE_SYSTEM_POLL_WAIT_SECONDS=0\n")
    srv = start_server({"TFWSGI_ENV_FILE": str(env_file)})
    srv.wait_ready()
    assert srv.post("/v1/models/hp:predict", json={"instances": [1.0]}).json() == {"predictions": [4.5]}

    # A new model name and a version policy pinned through the config file, picked up by SIGHUP.
    config = tmp_path / "m.config"
    config.write_text(f'model_config_list {{ config {{ name: "renamed" base_path: "{model_root}/hp" '
                      "model_version_policy { specific { versions: 2 } } } }")
    env_file.write_text(f"TFWSGI_MODEL_CONFIG_FILE={config}\n")
    with Load(srv.url + "/v1/models/renamed:predict", clients=2) as load:
        srv.rotate()
        until_every_worker(lambda: srv.post("/v1/models/renamed:predict", json={"instances": [1.0]})
                           .json().get("predictions"), [ANSWER[2]])
    assert srv.post("/v1/models/hp:predict", json={"instances": [1.0]}).status_code == 404
    assert {a for _, code, a in load.results if code == 200} <= {ANSWER[2]}
    # A broken file is refused: the server keeps its settings and keeps answering.
    env_file.write_text("TFWSGI_REST_API_PORT=not-a-port\n")
    srv.rotate()
    assert "settings not reloaded, the previous ones stay" in srv.log()
    r = srv.post("/v1/models/renamed:predict", json={"instances": [1.0]})
    assert r.json() == {"predictions": [ANSWER[2]]}
