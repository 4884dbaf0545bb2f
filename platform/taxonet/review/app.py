"""The review web app: one static page (``review/page/``) over a JSON API, served by Starlette.

Experts open the page, log in with the API token and their name, and label the crops serving was unsure about::

    GET  /                          the page (static; every /api/* call below is token-protected)
    GET  /healthz                   {"status": "ok"}: the process answers (Kubernetes probes; no token, no storage)
    POST /api/login                 {"token", "name"}: checks both, sets them as HttpOnly SameSite=Strict cookies
    GET  /api/session               {"reviewer": NAME or null}: logged in or not (never 401)
    GET  /api/me                    reviewer, ranks, families and sources for the filters
    GET  /api/taxa?q=               type-ahead over every taxon of the taxonomy
    GET  /api/next?status=&family=&source=&reason=&unsure_at=&limit=
                                    the next crops, most useful first, leased to the caller
    GET  /api/crops/ID[/image|/similar]
    POST /api/decisions             {"crop_ids", "kind", "rank", "taxon", "parent", "provisional", "request_id"}
    POST /api/skip                  {"crop_ids"}
    GET  /api/stats                 agreement per rank (Wilson intervals, Cohen's kappa), throughput
    GET  /api/export?format=csv|json[&history=1]

Scripts send ``Authorization: Bearer TOKEN`` and ``X-Reviewer: NAME`` instead of the cookies. Tokens come from
``$TAXONET_API_TOKEN`` or the file named by ``$TAXONET_API_TOKEN_FILE`` (comma-separated, whitespace stripped, any of
them accepted, like the API); none configured means no token is asked for (a name still is). A POST must be JSON,
which a cross-site form cannot send: with the SameSite cookies, that keeps other sites from deciding for a reviewer.
"""

from __future__ import annotations

import csv
import dataclasses
import hmac
import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from taxonet.review import records, stats
from taxonet.review.leases import Leases
from taxonet.review.records import Decision, QueueItem, RecordError
from taxonet.review.store import Filters, ReviewStore, decision_id
from taxonet.taxonomy import Taxonomy

TOKEN_COOKIE = "taxonet_review_token"
REVIEWER_COOKIE = "taxonet_reviewer"
PAGE_DIR = Path(__file__).parent / "page"
DEFAULT_PAGE_SIZE = 12
MAX_PAGE_SIZE = 100
MAX_BODY_BYTES = 256 * 1024
MAX_SELECTION = 500
#: a provisional species name: free text ("Apidae sp. A"), printable, bounded
_PROVISIONAL = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")


class ReviewApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class TaxonEntry:
    rank: str
    name: str
    chain: tuple[str, ...]


def taxon_index(taxonomy: Taxonomy) -> list[TaxonEntry]:
    return [TaxonEntry(rank, name, tuple(taxonomy.chain_names(level, index)))
            for level, rank in enumerate(taxonomy.ranks) for index, name in enumerate(taxonomy.names[level])]


def search_taxa(index: Sequence[TaxonEntry], query: str, limit: int, rank: str | None = None) -> list[TaxonEntry]:
    """Taxa (of ``rank``, default any) whose name contains every word of the query; names starting with it first,
    then names with a word starting with it, then by name."""
    words = query.lower().split()
    if not words:
        return []
    found = [entry for entry in index
             if (rank is None or entry.rank == rank) and all(word in entry.name.lower() for word in words)]
    found.sort(key=lambda e: (not e.name.lower().startswith(words[0]), not any(
        part.startswith(words[0]) for part in e.name.lower().split()), e.name.lower(), e.rank))
    return found[:limit]


def shared_rank(answers: Sequence[Mapping], taxonomy: Taxonomy) -> tuple[str, str] | None:
    """The deepest (rank, taxon) on whose whole chain every answer agrees and that the taxonomy knows."""
    best = None
    for level, rank in enumerate(taxonomy.ranks):
        labels = {(answer.get("ranks", {}).get(rank) or {}).get("label") for answer in answers}
        if len(labels) != 1:
            break
        label = labels.pop()
        if label is None or (rank, label) not in taxonomy:
            break
        chain = taxonomy.chain_names(level, taxonomy.index(level, label))
        if best is not None and chain[level - 1] != best[1]:
            break
        best = (rank, label)
    return best


class ReviewApp:
    """The routes over one :class:`ReviewStore` and one :class:`Leases`."""

    def __init__(self, store: ReviewStore, leases: Leases, tokens: Sequence[str]) -> None:
        self.store = store
        self.leases = leases
        self.tokens = tuple(tokens)
        self._taxa: tuple[Taxonomy, list[TaxonEntry]] | None = None

    @property
    def taxa(self) -> list[TaxonEntry]:
        """The type-ahead's index of the store's taxonomy, rebuilt when the store took a new one."""
        taxonomy = self.store.taxonomy
        if self._taxa is None or self._taxa[0] is not taxonomy:
            self._taxa = (taxonomy, taxon_index(taxonomy))
        return self._taxa[1]

    # ------------------------------------------------------------------ plumbing
    def starlette(self) -> Starlette:
        routes = [
            Route("/", self.page),
            Route("/healthz", self.healthz),
            Route("/api/login", self.login, methods=["POST"]),
            Route("/api/logout", self.logout, methods=["POST"]),
            Route("/api/session", self.session),
            Route("/api/me", self.me),
            Route("/api/taxa", self.search),
            Route("/api/next", self.next_crops),
            Route("/api/crops/{crop_id}", self.crop),
            Route("/api/crops/{crop_id}/image", self.image),
            Route("/api/crops/{crop_id}/similar", self.similar),
            Route("/api/decisions", self.decide, methods=["POST"]),
            Route("/api/skip", self.skip, methods=["POST"]),
            Route("/api/stats", self.statistics),
            Route("/api/export", self.export),
            Mount("/static", StaticFiles(directory=PAGE_DIR), name="static"),
        ]
        return Starlette(routes=routes, exception_handlers={ReviewApiError: _api_error, RecordError: _record_error,
                                                            HTTPException: _http_error})

    def _token_ok(self, request: Request) -> bool:
        if not self.tokens:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else request.cookies.get(TOKEN_COOKIE, "")
        return bool(given) and any(hmac.compare_digest(given.encode(), t.encode()) for t in self.tokens)

    def _authorize(self, request: Request) -> None:
        if not self._token_ok(request):
            raise ReviewApiError(401, "unauthorized", "log in with the API token (or send 'Authorization: Bearer "
                                 "TOKEN')")

    def _reviewer(self, request: Request) -> str:
        self._authorize(request)
        name = request.headers.get("x-reviewer") or request.cookies.get(REVIEWER_COOKIE)
        if not name:
            raise ReviewApiError(401, "no_reviewer", "log in with your name (or send 'X-Reviewer: NAME')")
        return records.check_name(name, "reviewer")

    async def _json(self, request: Request) -> dict:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise ReviewApiError(415, "unsupported_media_type", "send the body as application/json")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ReviewApiError(413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ReviewApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ReviewApiError(400, "bad_json", "the body must be a JSON object")
        return data

    async def _refresh(self) -> None:
        await run_in_threadpool(self.store.refresh)

    def _known_item(self, crop_id: str) -> QueueItem:
        item = self.store.item(crop_id)
        if item is None:
            raise ReviewApiError(404, "unknown_crop", f"no queued crop {crop_id!r}")
        return item

    # ------------------------------------------------------------------ views of crops
    def view(self, item: QueueItem, reviewer: str) -> dict:
        answer = self.store.answer(item.crop_id)
        labels = self.store.labels_of(item.crop_id)
        ranks = []
        for rank in self.store.taxonomy.ranks:
            entry = answer.get("ranks", {}).get(rank) or {}
            top = entry.get("top_k") or []
            ranks.append({"rank": rank, "label": entry.get("label"), "score": entry.get("score"),
                          "probability": top[0]["probability"] if top else None,
                          "reliable": bool(entry.get("reliable")), "confidence": entry.get("confidence"),
                          "top_k": top})
        holder = self.leases.holder(item.crop_id)
        return {
            "crop_id": item.crop_id, "batch_id": self.store.batch_of(item.crop_id), "reason": item.reason,
            "source": item.source, "queued_at": item.queued_at, "model": item.model,
            "model_version": item.model_version, "width": item.width, "height": item.height,
            "lowest_reliable_rank": item.lowest_reliable_rank, "ranks": ranks,
            "family": self.store.predicted(item.crop_id, self.store.family_rank),
            "labels": {who: d.to_dict() for who, d in sorted(labels.items())},
            "mine": labels[reviewer].to_dict() if reviewer in labels else None,
            "disputed": records.is_disputed(labels), "leased_by_other": holder not in (None, reviewer),
            "image": f"/api/crops/{item.crop_id}/image",
        }

    def _filters(self, request: Request) -> Filters:
        query = request.query_params
        return Filters(status=query.get("status") or "unreviewed", family=query.get("family") or None,
                       source=query.get("source") or None, reason=query.get("reason") or None,
                       unsure_at=query.get("unsure_at") or None)

    def _limit(self, request: Request, default: int) -> int:
        text = request.query_params.get("limit") or str(default)
        if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE_SIZE:
            raise ReviewApiError(400, "bad_limit", f"limit must be an integer from 1 to {MAX_PAGE_SIZE}")
        return int(text)

    # ------------------------------------------------------------------ routes
    async def page(self, request: Request) -> Response:
        return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def healthz(self, request: Request) -> Response:
        """Liveness and readiness: answers without a token and without touching storage, so a slow S3 endpoint
        never gets the server restarted (queue and labels are read on the next API call)."""
        return JSONResponse({"status": "ok"})

    async def login(self, request: Request) -> Response:
        data = await self._json(request)
        token, name = str(data.get("token") or "").strip(), data.get("name")
        if self.tokens and not any(hmac.compare_digest(token.encode(), t.encode()) for t in self.tokens):
            raise ReviewApiError(401, "unauthorized", "wrong token")
        name = records.check_name(name, "reviewer name")
        response = JSONResponse({"reviewer": name})
        secure = request.url.scheme == "https"
        if self.tokens:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", secure=secure)
        response.set_cookie(REVIEWER_COOKIE, name, httponly=True, samesite="strict", secure=secure)
        return response

    async def logout(self, request: Request) -> Response:
        response = JSONResponse({"reviewer": None})
        response.delete_cookie(TOKEN_COOKIE)
        response.delete_cookie(REVIEWER_COOKIE)
        return response

    async def session(self, request: Request) -> Response:
        """Whether the caller is logged in (200 either way, so the page asks for a login without an error)."""
        try:
            return JSONResponse({"reviewer": self._reviewer(request)})
        except (ReviewApiError, RecordError):
            return JSONResponse({"reviewer": None})

    async def me(self, request: Request) -> Response:
        reviewer = self._reviewer(request)
        await self._refresh()
        taxonomy = self.store.taxonomy
        return JSONResponse({"reviewer": reviewer, "ranks": list(taxonomy.ranks), "family_rank": self.store.family_rank,
                             "families": self.store.families(), "sources": self.store.sources(),
                             "queued": len(self.store.items()), "lease_s": self.leases.ttl_s})

    async def search(self, request: Request) -> Response:
        self._authorize(request)
        await self._refresh()  # at most every refresh_s: a taxonomy changed by a promote is searched after it
        found = search_taxa(self.taxa, request.query_params.get("q", ""), self._limit(request, 20),
                            request.query_params.get("rank") or None)
        return JSONResponse({"taxa": [{"rank": e.rank, "name": e.name, "chain": list(e.chain)} for e in found]})

    async def next_crops(self, request: Request) -> Response:
        """The next crops for this reviewer, leased to them; their earlier leases not on this page are released."""
        reviewer = self._reviewer(request)
        filters, limit = self._filters(request), self._limit(request, DEFAULT_PAGE_SIZE)
        await self._refresh()

        def available(crop: str) -> bool:
            return self.leases.available(crop, reviewer) and not (
                filters.status == "unreviewed" and self.leases.skipped(crop, reviewer))

        chosen = self.store.select(filters, reviewer, available)[:limit]
        granted = set(self.leases.acquire([item.crop_id for item in chosen], reviewer))
        self.leases.release_all_but(granted, reviewer)
        unreviewed = [item.crop_id for item in self.store.select(Filters(), reviewer, self._free_for(reviewer))]
        views = []
        for item in chosen:
            if item.crop_id in granted:
                view = self.view(item, reviewer)
                view["similar"] = [c for c, _ in self.store.similar(item.crop_id, unreviewed, MAX_PAGE_SIZE)]
                views.append(view)
        return JSONResponse({"crops": views, "filters": dataclasses.asdict(filters)})

    def _free_for(self, reviewer: str) -> Callable[[str], bool]:
        return lambda crop: self.leases.available(crop, reviewer)

    async def crop(self, request: Request) -> Response:
        reviewer = self._reviewer(request)
        await self._refresh()
        return JSONResponse(self.view(self._known_item(request.path_params["crop_id"]), reviewer))

    async def image(self, request: Request) -> Response:
        self._authorize(request)
        item = self._known_item(request.path_params["crop_id"])
        return Response(item.jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def similar(self, request: Request) -> Response:
        """Unreviewed crops that look like this one (cosine in the model's embedding), leased to the caller together
        with it, so one decision can name them all."""
        reviewer = self._reviewer(request)
        limit = self._limit(request, 24)
        await self._refresh()  # first: a crop queued since the last refresh is known after it
        item = self._known_item(request.path_params["crop_id"])
        candidates = [i.crop_id for i in self.store.select(Filters(), reviewer, self._free_for(reviewer))]
        found = self.store.similar(item.crop_id, candidates, limit)
        granted = set(self.leases.acquire([item.crop_id, *(c for c, _ in found)], reviewer))
        group = [self.view(item, reviewer)] + [
            {**self.view(self._known_item(crop), reviewer), "cosine": round(cosine, 4)}
            for crop, cosine in found if crop in granted]
        return JSONResponse({"crops": group})

    async def skip(self, request: Request) -> Response:
        reviewer = self._reviewer(request)
        data = await self._json(request)
        for crop in self._crop_ids(data):
            self.leases.skip(crop, reviewer)
        return JSONResponse({"skipped": self._crop_ids(data)})

    def _crop_ids(self, data: dict) -> list[str]:
        crops = data.get("crop_ids")
        if not isinstance(crops, list) or not crops or len(crops) > MAX_SELECTION:
            raise ReviewApiError(400, "bad_selection", f"crop_ids must be a list of 1 to {MAX_SELECTION} crop ids")
        crops = list(dict.fromkeys(records.check_id(c, "crop_id") for c in crops))
        for crop in crops:
            self._known_item(crop)
        return crops

    async def decide(self, request: Request) -> Response:
        """One decision for every selected crop. ``kind="accept"`` takes the model's answer, as deep as the
        selection's answers share a chain (one crop: its whole consistent chain)."""
        reviewer = self._reviewer(request)
        data = await self._json(request)
        await self._refresh()
        crops = self._crop_ids(data)
        kind = data.get("kind")
        fields = {"rank": data.get("rank") or None, "taxon": data.get("taxon") or None,
                  "parent": data.get("parent") or None, "provisional": (data.get("provisional") or "").strip() or None}
        taxonomy = self.store.taxonomy
        if kind == "accept":
            shared = shared_rank([self.store.answer(c) for c in crops], taxonomy)
            if shared is None:
                raise ReviewApiError(409, "nothing_shared", "the model's answers for these crops share no taxon: "
                                     "name one instead")
            kind, fields = "taxon", {"rank": shared[0], "taxon": shared[1], "parent": None, "provisional": None}
        if kind == "taxon":
            if (fields["rank"], fields["taxon"]) not in taxonomy or fields["rank"] not in taxonomy.ranks:
                raise ReviewApiError(400, "unknown_taxon", f"{fields['taxon']!r} is not a {fields['rank']} of the "
                                     "taxonomy")
            fields["parent"] = fields["provisional"] = None
        elif kind == "new_species":
            if fields["rank"] not in taxonomy.ranks or (fields["rank"], fields["parent"]) not in taxonomy:
                raise ReviewApiError(400, "unknown_taxon", f"the parent {fields['parent']!r} is not a "
                                     f"{fields['rank']} of the taxonomy")
            if taxonomy.level(fields["rank"]) == taxonomy.depth - 1:
                raise ReviewApiError(400, "bad_rank", "a new species needs a parent above the deepest rank")
            if fields["provisional"] is not None and not _PROVISIONAL.match(fields["provisional"]):
                raise ReviewApiError(400, "bad_name", "a provisional name is 1–64 printable characters")
            fields["taxon"] = None
        elif kind in ("reject", "retract"):
            fields = {"rank": None, "taxon": None, "parent": None, "provisional": None}
        else:
            raise ReviewApiError(400, "bad_kind", "kind must be one of accept, taxon, new_species, reject, retract")
        request_id = data.get("request_id")
        if request_id is not None:
            records.check_id(str(request_id), "request_id")
        decisions = [Decision(crop_id=crop, reviewer=reviewer, kind=kind, batch_id=self.store.batch_of(crop),
                              **fields, **({"decision_id": decision_id(reviewer, crop, str(request_id))}
                                           if request_id is not None else {}))
                     for crop in crops]
        written = await run_in_threadpool(self.store.decide, decisions)
        if kind != "retract":
            self.leases.release(crops, reviewer)
        return JSONResponse({"decisions": [d.to_dict() for d in written],
                             "crops": [self.view(self._known_item(c), reviewer) for c in crops]})

    async def statistics(self, request: Request) -> Response:
        self._authorize(request)
        await self._refresh()
        summary = await run_in_threadpool(stats.summary, self.store.items(), self.store.decisions(),
                                          self.store.taxonomy)
        counts = {"queued": len(self.store.items()),
                  "reviewed": sum(bool(self.store.labels_of(i.crop_id)) for i in self.store.items())}
        return JSONResponse({**summary, "counts": counts})

    async def export(self, request: Request) -> Response:
        """Current labels (one row per crop and reviewer, disputes marked), or with history=1 every decision."""
        self._authorize(request)
        fmt = request.query_params.get("format", "json")
        if fmt not in ("csv", "json"):
            raise ReviewApiError(400, "bad_format", "format must be csv or json")
        await self._refresh()
        history = request.query_params.get("history") in ("1", "true")
        rows = self.export_rows(history)
        if fmt == "json":
            return JSONResponse({"labels": rows}, headers={"Content-Disposition": 'attachment; filename="labels.json"'})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.export_columns(), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return Response(out.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="labels.csv"'})

    def export_columns(self) -> list[str]:
        return ["crop_id", "batch_id", "reviewer", "kind", "rank", "taxon", "parent", "provisional", "decided_at",
                "decision_id", "disputed", "source", "lowest_reliable_rank",
                *(f"model_{rank}" for rank in self.store.taxonomy.ranks)]

    def export_rows(self, history: bool) -> list[dict]:
        if history:
            decisions = self.store.decisions()
        else:
            decisions = [decision for item in self.store.items()
                         for _, decision in sorted(self.store.labels_of(item.crop_id).items())]
        rows = []
        for decision in decisions:
            item = self.store.item(decision.crop_id)
            row = {**decision.to_dict(), "disputed": records.is_disputed(self.store.labels_of(decision.crop_id)),
                   "source": item.source if item else None,
                   "lowest_reliable_rank": item.lowest_reliable_rank if item else None}
            for rank in self.store.taxonomy.ranks:
                row[f"model_{rank}"] = self.store.predicted(decision.crop_id, rank)
            rows.append(row)
        return rows


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ReviewApiError)
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status)


async def _record_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": {"code": "bad_request", "message": str(exc)}}, status_code=400)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": {"code": "http", "message": exc.detail}}, status_code=exc.status_code)


def build_app(store: ReviewStore, leases: Leases, tokens: Sequence[str]) -> Starlette:
    return ReviewApp(store, leases, tokens).starlette()
