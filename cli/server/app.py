"""``layerbase serve``'s HTTP JSON API: the Python API (``layerbase.api``) behind FastAPI.

One process keeps the models, the connection pool and the caches warm. Every route is a
plain function, which FastAPI runs in its thread pool: a forward pass (a new text's
neighbours, a generation) never blocks the event loop, and models load once, in the
Layerbase object's ``ModelCache`` (least recently used out, within its memory budget).

Reads go through an engine whose transactions are read-only. The one route that writes
(storing a transferred steering vector) exists only with ``--allow-writes`` and answers only
a bearer token. Every error a request can cause is a 4xx JSON body ``{"error": ...}`` that
names the problem, as the CLI's one line does; FastAPI's own validation errors are 422.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from pathlib import Path as PathLib
from typing import Any

import psycopg
import sqlalchemy as sa
from fastapi import Body, FastAPI, Header, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from layerbase.api import Layerbase
from layerbase.cli.common import neighbors_answer, records
from layerbase.warehouse.engine import first_line
from layerbase.warehouse.errors import DatabaseError, LayerbaseError, NotFoundError

# The limits on a request (docs/serve.md). k: the neighbours of one answer; text: a new
# text or a prompt to continue; tokens: one generation; body: a request's bytes.
LIMITS = {"k": 1000, "text_chars": 10_000, "max_new_tokens": 256, "body_bytes": 64 * 1024}
# The explorer's page, script and style: shipped in the package, no CDN (users may be offline).
STATIC = PathLib(__file__).with_name("static")


class TextQuery(BaseModel):
    """A new text whose neighbours are wanted."""

    model: str = Field(min_length=1, max_length=200)
    dataset: str = Field(min_length=1, max_length=200)
    layer: int = Field(ge=0, le=10_000)
    text: str = Field(min_length=1, max_length=LIMITS["text_chars"])
    k: int = Field(10, ge=1, le=LIMITS["k"])


class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=LIMITS["text_chars"])
    coefficient: float = Field(1.0, ge=-1e6, le=1e6)
    max_new_tokens: int = Field(40, ge=1, le=LIMITS["max_new_tokens"])
    model: str | None = Field(None, min_length=1, max_length=200)
    layer: int | None = Field(None, ge=0, le=10_000)


class TransferRequest(BaseModel):
    to: str = Field(min_length=1, max_length=200)
    layer: int | None = Field(None, ge=0, le=10_000)
    calibrate: str = Field("contrast", min_length=1, max_length=200)
    name: str | None = Field(None, min_length=1, max_length=200)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _status(exc: LayerbaseError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, DatabaseError):
        return 503
    return 400


def read_only_api(lb: Layerbase) -> Layerbase:
    """``lb``'s warehouse in read-only transactions, sharing ``lb``'s loaded models."""
    from layerbase.warehouse.engine import read_only

    read = Layerbase(read_only(lb.warehouse), progress=False)
    read.model_cache = lb.model_cache
    return read


def create_app(
    read: Layerbase, write: Layerbase | None = None, token: str | None = None, request_timeout: float = 300.0
) -> FastAPI:
    """The app over ``read`` (a Layerbase on read-only transactions), and over ``write`` for
    the routes that store something, when writes are allowed (then ``token`` is required).
    A request that runs past ``request_timeout`` seconds is answered 503."""
    if write is not None and not token:
        raise ValueError("writes need a bearer token")
    app = FastAPI(
        title="Layerbase",
        version="0.2",
        description="Neighbour lookups, affinity matrices and steering over a Layerbase warehouse.",
    )

    @app.exception_handler(LayerbaseError)
    async def layerbase_error(request: Request, exc: LayerbaseError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=_status(exc))

    # A value the database cannot hold (a NUL character, a lone surrogate) in any parameter:
    # Schemathesis found a NUL in a model name giving a 500 before these handlers.
    @app.exception_handler(sa.exc.DataError)
    @app.exception_handler(psycopg.DataError)
    async def unstorable_value(request: Request, exc: Exception) -> JSONResponse:
        cause = getattr(exc, "orig", None) or exc
        return JSONResponse({"error": f"a value the database cannot hold: {first_line(cause)}"}, status_code=400)

    @app.exception_handler(UnicodeEncodeError)
    async def not_unicode(request: Request, exc: UnicodeEncodeError) -> JSONResponse:
        bad = exc.object[exc.start : exc.end] if isinstance(exc.object, str) else ""
        return JSONResponse({"error": f"a text holds {bad!r}, which is not valid Unicode"}, status_code=400)

    @app.middleware("http")
    async def limit_time(request: Request, call_next: Any) -> Any:
        # The route's thread cannot be stopped: its work may still finish, unseen.
        try:
            return await asyncio.wait_for(call_next(request), request_timeout)
        except TimeoutError:
            return JSONResponse(
                {
                    "error": f"the request ran past this server's limit of {request_timeout:g} s "
                    "(--request-timeout); ask for less (k, max_new_tokens), or retry when it is less busy"
                },
                status_code=503,
                headers={"Retry-After": "5"},
            )

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > LIMITS["body_bytes"]):
            return JSONResponse({"error": f"the body is over {LIMITS['body_bytes']} bytes"}, status_code=413)
        return await call_next(request)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def explorer() -> FileResponse:
        """The web explorer: one page over this API, its assets shipped in the package."""
        return FileResponse(STATIC / "index.html")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        """The server answers, and its warehouse: URL (password hidden), server and pgvector."""
        from layerbase.warehouse.status import server_versions

        server, pgvector = server_versions(read.warehouse)
        return {"status": "ok", "database": read.url, "server": server, "pgvector": pgvector, "writes": bool(write)}

    @app.get("/api/models")
    def models() -> list[dict[str, Any]]:
        """Stored models with their extraction settings."""
        return _clean(records(read.models()))

    @app.get("/api/datasets")
    def datasets() -> list[dict[str, Any]]:
        """Registered datasets with their sizes."""
        return _clean(records(read.datasets()))

    @app.get("/api/affinity")
    def affinity_runs() -> list[dict[str, Any]]:
        """Stored affinity runs: models, datasets, measure and its parameters, diagonal test,
        whether current."""
        return _clean(records(read.affinity_runs()))

    @app.get("/api/affinity/{run}")
    def affinity_run(run: int = Path(ge=1, le=2**31 - 1)) -> dict[str, Any]:
        """One stored run of any measure: the matrix with its layers and relative depths, the
        null level per cell, the diagonal test, bootstrap intervals and the max-similarity path."""
        m = read.affinity_run(run)
        return _clean(
            {
                **m.summary(),
                "label": m.label,
                "describe_parameters": m.describe_parameters,
                "cell_chance": None if m.cell_chance is None else m.cell_chance.tolist(),
                "layers_a": m.layers_a,
                "layers_b": m.layers_b,
                "depths_a": [layer / m.n_layers_a for layer in m.layers_a],
                "depths_b": [layer / m.n_layers_b for layer in m.layers_b],
                "scores": m.scores.tolist(),
                "path": records(m.path),
            }
        )

    def _answer(frame: Any) -> dict[str, Any]:
        return _clean(neighbors_answer(frame, frame.attrs, ranks=True))

    @app.get("/api/neighbors")
    def neighbors(
        model: str = Query(min_length=1, max_length=200),
        dataset: str = Query(min_length=1, max_length=200),
        layer: int = Query(ge=0, le=10_000),
        prompt: int = Query(ge=0, le=2**31 - 1, description="0-based position of a stored prompt"),
        k: int = Query(10, ge=1, le=LIMITS["k"]),
        exact: bool = False,
        where_text: str | None = Query(None, min_length=1, max_length=LIMITS["text_chars"]),
        where_source: str | None = Query(None, min_length=1, max_length=1000),
    ) -> dict[str, Any]:
        """The k nearest prompts of a stored prompt, and the path that answered."""
        found = read.neighbors(
            model, dataset, layer, prompt=prompt, k=k, exact=exact, where_text=where_text, where_source=where_source
        )
        return _answer(found)

    @app.post("/api/neighbors")
    def text_neighbors(query: TextQuery = Body()) -> dict[str, Any]:
        """The k nearest prompts of a new text (one forward pass, off the event loop)."""
        return _answer(read.neighbors(query.model, query.dataset, query.layer, text=query.text, k=query.k))

    @app.get("/api/overlap")
    def overlap(
        prompt: int = Query(ge=0, le=2**31 - 1),
        model_a: str = Query(min_length=1, max_length=200),
        layer_a: int = Query(ge=0, le=10_000),
        dataset_a: str = Query(min_length=1, max_length=200),
        model_b: str = Query(min_length=1, max_length=200),
        layer_b: int = Query(ge=0, le=10_000),
        dataset_b: str | None = Query(None, min_length=1, max_length=200),
        k: int = Query(10, ge=1, le=LIMITS["k"]),
    ) -> dict[str, Any]:
        """One prompt's neighbour sets at two (model, layer) places, the shared ones marked."""
        both = read.overlap(prompt, (model_a, layer_a, dataset_a), (model_b, layer_b, dataset_b or dataset_a), k)
        sides = {}
        for side in ("first", "second"):
            rows = both[both["side"] == side]
            keep = ("rank", "position", "text", "distance", "shared")
            sides[side] = both.attrs[side] | {"neighbors": [{key: r[key] for key in keep} for r in records(rows)]}
        return _clean({**sides, "shared": both.attrs["shared"], "overlap": both.attrs["overlap"]})

    @app.get("/api/steering")
    def steering() -> list[dict[str, Any]]:
        """Stored steering vectors with their model, layer, method and norms."""
        return _clean(records(read.steering_vectors()))

    @app.post("/api/steering/{name}/generate")
    def generate(name: str = Path(min_length=1, max_length=200), request: GenerateRequest = Body()) -> dict[str, Any]:
        """The prompt continued unsteered and with coefficient x the vector, side by side."""
        return _clean(
            read.generate(
                name,
                request.prompt,
                request.coefficient,
                max_new_tokens=request.max_new_tokens,
                model=request.model,
                layer=request.layer,
            )
        )

    @app.post("/api/steering/{name}/transfer", responses={401: {}, 403: {}})
    def transfer(
        name: str = Path(min_length=1, max_length=200),
        request: TransferRequest = Body(),
        authorization: str | None = Header(None),
    ) -> Any:
        """Map a stored vector into another model (reusing a stored Emb2Emb map) and store it:
        a write, so only with ``--allow-writes`` and the bearer token."""
        if write is None:
            return JSONResponse(
                {"error": "this server is read-only; start it with --allow-writes to store vectors"}, status_code=403
            )
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not given or not secrets.compare_digest(given.encode(), (token or "").encode()):
            return JSONResponse({"error": "a write needs the server's bearer token"}, status_code=401)
        moved = write.transfer(name, to=request.to, layer=request.layer, calibrate=request.calibrate, name=request.name)
        return _clean({"vector": moved.vector.as_dict(), "map": moved.map.as_dict(), "calibration": moved.calibration})

    return app
