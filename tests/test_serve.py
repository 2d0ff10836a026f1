"""``layerbase serve``: the HTTP API in-process (FastAPI's client), fuzzed from its OpenAPI
document, and as a real server on loopback."""

from __future__ import annotations

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from layerbase.analysis.knn.topk import exact_topk
from layerbase.ingest.synthetic import store_synthetic
from tests.conftest import random_texts, write_lines
from tests.helpers import cli

TOKEN = "s3cret-token"


@pytest.fixture
def served(wh, db_url: str, tiny_models, tmp_path):
    """A warehouse with synthetic and tiny real models, and the app over it (writes allowed)."""
    from fastapi.testclient import TestClient

    import layerbase
    from layerbase.cli.server.app import create_app, read_only_api

    store_synthetic(wh, "A", "d", n=60, d=8, n_layers=3, seed=1)
    store_synthetic(wh, "B", "d", n=60, d=8, n_layers=2, seed=2)
    lb = layerbase.connect(db_url, progress=False)
    lb.knn("A", "d", k=10)
    lb.affinity("A", "B", "d", k=5)
    for seed, name in enumerate(("pos", "neg")):
        prompts = write_lines(tmp_path / f"{name}.txt", random_texts(8, seed=seed))
        assert cli("dataset", "add", name, str(prompts)).exit_code == 0
    lb.ingest(str(tiny_models["gpt2"]), ["pos", "neg"], name="g")
    lb.make_steering_vector("g", 2, "pos", "neg", name="v")
    read = read_only_api(lb)
    app = create_app(read, lb, TOKEN)
    with TestClient(app) as client:
        yield {"client": client, "lb": lb, "app": app}
    read.warehouse.engine.dispose()


def test_routes_answer_and_a_stored_prompt_gets_its_exact_neighbours(served) -> None:
    client, lb = served["client"], served["lb"]
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["pgvector"].startswith("0.8") and health["writes"] is True
    assert {m["name"] for m in client.get("/api/models").json()} == {"A", "B", "g"}
    assert {d["name"] for d in client.get("/api/datasets").json()} == {"d", "pos", "neg"}
    runs = client.get("/api/affinity").json()
    assert len(runs) == 1 and runs[0]["is_current"] is True
    matrix = client.get(f"/api/affinity/{runs[0]['run_id']}").json()
    assert np.array(matrix["scores"]).shape == (3, 2) and matrix["depths_a"] == [1 / 3, 2 / 3, 1.0]
    assert matrix["measure"] == "mutual_knn" and len(matrix["path"]) == 3 and matrix["test"] is not None

    found = client.get("/api/neighbors", params={"model": "A", "dataset": "d", "layer": 2, "prompt": 7, "k": 5}).json()
    truth = exact_topk(lb.activations("A", "d", 2), 5, queries=np.array([7]))[0][0]
    assert [n["position"] for n in found["neighbors"]] == list(truth)
    assert found["path"].startswith("stored k-NN set") and [n["rank"] for n in found["neighbors"]] == [1, 2, 3, 4, 5]

    text = client.post(
        "/api/neighbors", json={"model": "g", "dataset": "pos", "layer": 1, "text": "a new text", "k": 3}
    )
    assert text.status_code == 200 and len(text.json()["neighbors"]) == 3 and text.json()["query"] == "text: a new text"
    both = client.get(
        "/api/overlap",
        params={"prompt": 3, "model_a": "A", "layer_a": 1, "dataset_a": "d", "model_b": "B", "layer_b": 2, "k": 4},
    ).json()
    shared = {n["position"] for n in both["first"]["neighbors"]} & {n["position"] for n in both["second"]["neighbors"]}
    assert sorted(shared) == both["shared"] and all(
        n["shared"] == (n["position"] in shared) for n in both["first"]["neighbors"]
    )

    assert [v["name"] for v in client.get("/api/steering").json()] == ["v"]
    out = client.post("/api/steering/v/generate", json={"prompt": "the cat", "coefficient": 50, "max_new_tokens": 4})
    assert out.status_code == 200 and {"steered", "unsteered"} <= set(out.json())


@pytest.mark.parametrize(
    "method, url, body, status, needle",
    [
        ("get", "/api/neighbors?model=nope&dataset=d&layer=1&prompt=0", None, 404, "no model named 'nope'"),
        ("get", "/api/neighbors?model=A&dataset=d&layer=9&prompt=0", None, 400, "layer 9 is not stored"),
        ("get", "/api/neighbors?model=A&dataset=d&layer=1&prompt=0&k=0", None, 422, "k"),
        ("get", "/api/neighbors?model=A&dataset=d&layer=1&prompt=600", None, 400, "outside"),
        ("get", "/api/neighbors?model=A&dataset=d&layer=one&prompt=0", None, 422, "layer"),
        ("get", "/api/neighbors?model=A&dataset=d&prompt=0", None, 422, "layer"),
        ("get", "/api/affinity/999", None, 404, "no affinity run 999"),
        ("post", "/api/neighbors", {"model": "g", "dataset": "pos", "layer": 1}, 422, "text"),
        ("post", "/api/steering/nope/generate", {"prompt": "x"}, 404, "no steering vector named 'nope'"),
        ("post", "/api/steering/v/generate", {"prompt": "x", "max_new_tokens": 100000}, 422, "max_new_tokens"),
        # values the database cannot hold (Schemathesis found the first)
        ("get", "/api/neighbors?model=A%00&dataset=d&layer=1&prompt=0", None, 400, "NUL"),
        ("post", "/api/neighbors", {"model": "g\u0000", "dataset": "pos", "layer": 1, "text": "x"}, 400, "NUL"),
        ("get", "/api/overlap?prompt=0&model_a=A&layer_a=1&dataset_a=d%00&model_b=B&layer_b=1", None, 400, "NUL"),
    ],
)
def test_bad_requests_get_4xx_json_that_names_the_problem(served, method, url, body, status, needle) -> None:
    response = getattr(served["client"], method)(url, **({"json": body} if body is not None else {}))
    assert response.status_code == status, response.text
    assert needle in response.text and response.headers["content-type"].startswith("application/json")


def test_writes_need_the_flag_and_the_token(served, db_url: str) -> None:
    from fastapi.testclient import TestClient

    from layerbase.cli.server.app import LIMITS, create_app

    client = served["client"]
    body = {"to": "g", "layer": 1, "calibrate": "none", "name": "copy"}
    assert client.post("/api/steering/v/transfer", json=body).status_code == 401
    wrong = client.post("/api/steering/v/transfer", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]
    same_model = client.post("/api/steering/v/transfer", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert same_model.status_code == 400 and "already lives in g" in same_model.json()["error"]
    with TestClient(create_app(served["lb"])) as read_only:
        refused = read_only.post("/api/steering/v/transfer", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert refused.status_code == 403 and "--allow-writes" in refused.json()["error"]
    big = client.post(
        "/api/neighbors", content=b"x" * (LIMITS["body_bytes"] + 1), headers={"content-type": "application/json"}
    )
    assert big.status_code == 413


api_schema = schemathesis.pytest.from_fixture("openapi_schema")


@pytest.fixture
def openapi_schema(served):
    return schemathesis.openapi.from_asgi("/openapi.json", served["app"])


@api_schema.parametrize()
# derandomize: the same requests on every run, so that a failure reproduces and CI stays stable.
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case) -> None:
    """Schemathesis draws requests from the OpenAPI document: none may get a 5xx."""
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500, (case.method, case.formatted_path, case.query, case.body, response.text)


def test_layerbase_serve_answers_on_loopback(wh, db_url: str) -> None:
    """The real command: uvicorn on 127.0.0.1, read-only by default, no password in its output."""
    import json
    import socket
    import time
    import urllib.request

    from tests.helpers import cli_subprocess

    store_synthetic(wh, "A", "d", n=30, d=8, n_layers=2, seed=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = cli_subprocess("serve", "--port", str(port))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
                time.sleep(0.3)
        assert health["status"] == "ok" and health["writes"] is False
        url = f"http://127.0.0.1:{port}/api/neighbors?model=A&dataset=d&layer=1&prompt=2&k=3"
        with urllib.request.urlopen(url, timeout=10) as r:
            answer = json.loads(r.read())
        assert len(answer["neighbors"]) == 3 and answer["path"].startswith("exact scan")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in err and "Traceback" not in err


def test_allow_writes_without_a_token_is_refused() -> None:
    from tests.helpers import assert_clean_error

    result = cli("serve", "--allow-writes", "--token-env", "NO_SUCH_TOKEN_VAR")
    assert_clean_error(result, "needs a bearer token", "$NO_SUCH_TOKEN_VAR")


def test_threads_that_share_a_model_never_see_each_others_steering(served) -> None:
    """The server runs lookups and generations on one loaded model from many threads: a
    steering hook of one must never reach another's forward pass."""
    import threading

    lb = served["lb"]
    reference = lb.neighbors("g", "pos", 2, text="a new text", k=3)
    seen, failures = [], []

    def lookups() -> None:
        for _ in range(25):
            found = lb.neighbors("g", "pos", 2, text="a new text", k=3)
            seen.append(found["distance"].tolist())

    def steering() -> None:
        try:
            for _ in range(8):
                lb.generate("v", "the cat", 500.0, max_new_tokens=6)
        except Exception as exc:
            failures.append(exc)

    threads = [threading.Thread(target=lookups), threading.Thread(target=steering), threading.Thread(target=lookups)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and len(seen) == 50
    assert all(distances == reference["distance"].tolist() for distances in seen)


def test_a_request_past_the_time_limit_is_answered_503(served) -> None:
    """A request whose work runs past --request-timeout gets a JSON 503 with Retry-After,
    and the server keeps answering others."""
    import time as clock

    from fastapi.testclient import TestClient

    from layerbase.api import Layerbase
    from layerbase.cli.server.app import create_app

    class Slow(Layerbase):
        def models(self):  # type: ignore[override]
            clock.sleep(1.5)
            return super().models()

    lb = served["lb"]
    slow = Slow(lb.warehouse, progress=False)
    with TestClient(create_app(slow, request_timeout=0.3)) as client:
        late = client.get("/api/models")
        assert late.status_code == 503 and "--request-timeout" in late.json()["error"]
        assert late.headers["retry-after"] == "5"
        assert client.get("/api/datasets").status_code == 200
