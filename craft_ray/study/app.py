"""The reader web app (FastAPI): sign in with a token, answer one pair at a time, resume, change answers.

Routes (every one but the page and sign-in needs the reader's cookie, else 401):

- ``GET /`` the reading page (``/?token=T`` signs in, sets the cookie and redirects to ``/``);
- ``POST /api/signin`` ``{"token": T}`` sets the cookie; ``POST /api/signout`` clears it;
- ``GET /api/next`` the reader's first unanswered pair (or ``{"pair": null}`` when done);
- ``GET /api/item/{position}`` the pair at a 1-based position of the reader's order, with their own answer;
- ``POST /api/answers`` ``{"pair", "choice", "rating_left", "rating_right", "reason", "change"}``: 201, or
  404 (pair not in this study or not the reader's), 409 (answered before and ``change`` not set),
  422 (choice not left/right/tie, rating not 1..5, unknown field);
- ``GET /img/{token}.png`` a study image by its opaque token.

Nothing a reader can request names an arm or another reader's answers: pairs and images travel
under random tokens and the answers returned are always the caller's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import Cookie, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from craft_ray.study.pages import reading_page
from craft_ray.study.store import AlreadyAnswered, Reader, Store

COOKIE = "craft_study_token"
MAX_REASON = 2000  # characters of a free-text reason

_SECURITY_HEADERS = {
    # Inline CSS/JS only (the page works offline), images from this server, no framing, no referrer
    # (the sign-in URL carries the token).
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=200)


class AnswerIn(BaseModel):
    """One answer from a reader; ``change`` must be true to replace an earlier answer to the same pair."""

    model_config = ConfigDict(extra="forbid")
    pair: str = Field(min_length=1, max_length=100)
    choice: Literal["left", "right", "tie"]
    rating_left: int | None = Field(default=None, ge=1, le=5)
    rating_right: int | None = Field(default=None, ge=1, le=5)
    reason: str = Field(default="", max_length=MAX_REASON)
    change: bool = False


def create_app(study_dir: str | Path) -> FastAPI:
    """The app serving the study in ``study_dir`` (which must exist)."""
    store = Store.open(study_dir)
    title = str(store.meta().get("name", "reader study"))
    app = FastAPI(title="craft_ray reader study", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    def reader_of(token: str | None) -> Reader:
        reader = store.reader(token) if token else None
        if reader is None:
            raise HTTPException(401, "sign in with the token the study creator gave you")
        return reader

    def set_cookie(response: Response, token: str) -> None:
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=90 * 24 * 3600)

    def item(reader: Reader, position: int | None) -> dict[str, Any]:
        done, total = store.progress(reader.id)
        out: dict[str, Any] = {"reader": reader.name, "done": done, "total": total, "item": None}
        if position is not None:
            it = store.item(reader.id, position)
            if it is None:
                raise HTTPException(404, f"no pair at position {position}; positions are 1..{total}")
            it["left"], it["right"] = f"/img/{it['left']}.png", f"/img/{it['right']}.png"
            out["item"] = it
        return out

    @app.get("/", response_class=HTMLResponse)
    def page(token: str | None = None) -> Response:
        if token is None:
            return HTMLResponse(reading_page(title))
        if store.reader(token) is None:
            return HTMLResponse(reading_page(title, "Unknown token. Check the link or token you were given."),
                                status_code=401)
        response = RedirectResponse("/", status_code=303)  # drop the token from the address bar
        set_cookie(response, token)
        return response

    @app.post("/api/signin")
    def signin(body: SignIn) -> Response:
        reader = reader_of(body.token)
        response = JSONResponse({"reader": reader.name})
        set_cookie(response, body.token)
        return response

    @app.post("/api/signout")
    def signout() -> Response:
        response = JSONResponse({"signed_out": True})
        response.delete_cookie(COOKIE)
        return response

    @app.get("/api/next")
    def next_pair(craft_study_token: str | None = Cookie(None)) -> dict[str, Any]:
        reader = reader_of(craft_study_token)
        return item(reader, store.next_position(reader.id))

    @app.get("/api/item/{position}")
    def item_at(position: int, craft_study_token: str | None = Cookie(None)) -> dict[str, Any]:
        return item(reader_of(craft_study_token), position)

    @app.post("/api/answers", status_code=201)
    def answer(body: AnswerIn, craft_study_token: str | None = Cookie(None)) -> dict[str, Any]:
        reader = reader_of(craft_study_token)
        pair_id = store.assigned_pair(reader.id, body.pair)
        if pair_id is None:
            raise HTTPException(404, f"pair {body.pair!r} is not one of your pairs in this study")
        try:
            store.answer(reader.id, pair_id, body.choice, body.rating_left, body.rating_right, body.reason.strip(),
                         change=body.change)
        except AlreadyAnswered:
            raise HTTPException(409, "you answered this pair already; send change=true to replace the answer") from None
        done, total = store.progress(reader.id)
        return {"stored": True, "done": done, "total": total}

    @app.get("/img/{name}")
    def image(name: str, craft_study_token: str | None = Cookie(None)) -> Response:
        reader_of(craft_study_token)
        path = store.image_file(name.removesuffix(".png")) if name.endswith(".png") else None
        if path is None or not path.is_file():
            raise HTTPException(404, "no such image")
        # Images never change; a private cache saves reloading them when the reader goes back.
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    return app
