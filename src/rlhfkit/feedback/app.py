"""The labeling web app (FastAPI): labelers rank completions, the admin watches agreement and exports.

Every endpoint but the login and invite pages needs a session (a signed, HTTP-only, SameSite=strict
cookie; Secure when ``secure_cookies``). Every state-changing request needs the session's CSRF token:
a hidden form field on forms, the ``X-CSRF-Token`` header on JSON calls. Labelers see only their own
items and work; the admin pages and the export need the admin role.

JSON API (what the labeler page and the simulated labelers use):
    POST /api/login {username, password} → {csrf}      GET /api/next?project=NAME → item | 204
    POST /api/labels {item_id, groups, flagged, seconds} → {label_id, duplicate}
    POST /api/skip {item_id}                             POST /api/invite/{token} {password}
    POST /api/admin/users {username, role} → {invite}    GET /api/admin/stats?project=NAME
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from fastapi import Depends, FastAPI, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.sessions import SessionMiddleware

from rlhfkit.feedback import service
from rlhfkit.feedback.db import Setting, User, session_factory

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
# a statistic that is undefined (too few labels yet) shows as a dash
TEMPLATES.env.filters["num"] = lambda v: "–" if v is None or v != v else f"{v:.3f}"


class LoginBody(BaseModel):
    username: str
    password: str


class LabelBody(BaseModel):
    item_id: int
    groups: list[list[str]]
    flagged: list[str] = []
    seconds: float | None = None


class ItemBody(BaseModel):
    item_id: int


class UserBody(BaseModel):
    username: str
    role: str = "labeler"


class PasswordBody(BaseModel):
    password: str


def _secret(sessions: sessionmaker) -> str:
    """The session signing key, kept in the database so that sessions survive a restart."""
    with sessions() as db:
        row = db.get(Setting, "session_secret")
        if row is None:
            row = Setting(key="session_secret", value=secrets.token_urlsafe(32))
            db.add(row)
            db.commit()
        return row.value


def create_app(db_url: str, secure_cookies: bool = False) -> FastAPI:
    sessions = session_factory(db_url)
    app = FastAPI(title="rlhfkit feedback", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware, secret_key=_secret(sessions), same_site="strict",
                       https_only=secure_cookies, max_age=14 * 24 * 3600)
    app.state.sessions = sessions

    def db():
        with sessions() as session:
            yield session

    def csrf_token(request: Request) -> str:
        if "csrf" not in request.session:
            request.session["csrf"] = secrets.token_urlsafe(32)
        return request.session["csrf"]

    def check_csrf(request: Request, given: str | None) -> None:
        expected = request.session.get("csrf")
        if not expected or not given or not secrets.compare_digest(expected, given):
            raise HTTPException(403, "missing or wrong CSRF token")

    def current_user(request: Request, session: Session = Depends(db)) -> User:
        user = session.get(User, request.session.get("user_id", -1))
        session.commit()  # short transactions: do not hold the database while the endpoint works
        if user is None:
            raise HTTPException(401, "log in first")
        return user

    def admin_user(user: User = Depends(current_user)) -> User:
        if user.role != "admin":
            raise HTTPException(403, "admins only")
        return user

    def api_user(request: Request, user: User = Depends(current_user)) -> User:
        """A JSON call that changes state: the CSRF token must come in the X-CSRF-Token header."""
        check_csrf(request, request.headers.get("x-csrf-token"))
        return user

    def api_admin(request: Request, user: User = Depends(admin_user)) -> User:
        check_csrf(request, request.headers.get("x-csrf-token"))
        return user

    @app.exception_handler(service.FeedbackError)
    async def _feedback_error(_request: Request, exc: service.FeedbackError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse("/login", 303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    # ------------------------------------------------------------ pages
    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, error: str = ""):
        return TEMPLATES.TemplateResponse(request, "login.html", {"csrf": csrf_token(request), "error": error})

    @app.post("/login")
    def login_form(request: Request, username: str = Form(...), password: str = Form(...), csrf: str = Form(""),
                   session: Session = Depends(db)):
        check_csrf(request, csrf)
        user = service.authenticate(session, username, password)
        if user is None:
            return RedirectResponse("/login?error=wrong+username+or+password", 303)
        request.session.clear()
        request.session.update(user_id=user.id, csrf=secrets.token_urlsafe(32))
        return RedirectResponse("/admin" if user.role == "admin" else "/", 303)

    @app.post("/logout")
    def logout(request: Request, csrf: str = Form("")):
        check_csrf(request, csrf)
        request.session.clear()
        return RedirectResponse("/login", 303)

    @app.get("/invite/{token}", response_class=HTMLResponse)
    def invite_page(request: Request, token: str):
        return TEMPLATES.TemplateResponse(request, "invite.html", {"csrf": csrf_token(request), "token": token})

    @app.post("/invite/{token}")
    def invite_form(request: Request, token: str, password: str = Form(...), csrf: str = Form(""),
                    session: Session = Depends(db)):
        check_csrf(request, csrf)
        user = service.accept_invite(session, token, password)
        request.session.clear()
        request.session.update(user_id=user.id, csrf=secrets.token_urlsafe(32))
        return RedirectResponse("/", 303)

    @app.get("/", response_class=HTMLResponse)
    def label_page(request: Request, project: str | None = None, user: User = Depends(current_user),
                   session: Session = Depends(db)):
        chosen = service.get_project(session, project)
        import markdown

        return TEMPLATES.TemplateResponse(request, "label.html", {
            "csrf": csrf_token(request), "user": user, "project": chosen,
            "instructions": markdown.markdown(chosen.instructions)})

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request, project: str | None = None, user: User = Depends(admin_user),
                   session: Session = Depends(db)):
        from rlhfkit.data.pairs import CONSENSUS

        projects = session.scalars(select(service.Project).order_by(service.Project.id)).all()
        context = {"csrf": csrf_token(request), "user": user, "projects": projects, "consensus": sorted(CONSENSUS),
                   "labelers": session.scalars(select(User).order_by(User.id)).all()}
        if projects:
            chosen = service.get_project(session, project or projects[0].name)
            stats = service.project_agreement(session, chosen)
            context |= {"project": chosen, "progress": service.progress(session, chosen), "stats": stats,
                        "plot": _labeler_plot(stats)}
        return TEMPLATES.TemplateResponse(request, "admin.html", context)

    @app.post("/admin/projects")
    async def create_project_form(request: Request, name: str = Form(...), criterion: str = Form(...),
                                  instructions: str = Form(""), overlap: int = Form(3),
                                  consensus: str = Form("borda"), gold_rate: float = Form(0.1),
                                  completions: UploadFile | None = None, gold: UploadFile | None = None,
                                  csrf: str = Form(""), user: User = Depends(admin_user),
                                  session: Session = Depends(db)):
        check_csrf(request, csrf)
        from rlhfkit.data.records import Completion, Ranking

        records = _upload_records(await completions.read(), completions.filename, Completion) if completions else []
        answers = _upload_records(await gold.read(), gold.filename, Ranking) if gold and gold.filename else []
        service.create_project(session, name, criterion, records, instructions, overlap, consensus, answers,
                               gold_rate)
        return RedirectResponse(f"/admin?project={name}", 303)

    @app.post("/admin/users")
    def create_user_form(request: Request, username: str = Form(...), role: str = Form("labeler"),
                         csrf: str = Form(""), user: User = Depends(admin_user), session: Session = Depends(db)):
        check_csrf(request, csrf)
        service.create_user(session, username, role)
        return RedirectResponse("/admin", 303)

    @app.get("/admin/export/{kind}")
    def export_file(kind: str, project: str, keep_poor: bool = False, user: User = Depends(admin_user),
                    session: Session = Depends(db)):
        if kind not in ("rankings", "pairs"):
            raise HTTPException(404, "export rankings or pairs")
        kept, pairs = service.export(session, service.get_project(session, project), keep_poor)
        records = kept if kind == "rankings" else pairs
        body = "".join(json.dumps({"schema": r.schema_name(), **r.model_dump(mode="json")}, ensure_ascii=False) + "\n"
                       for r in records)
        return PlainTextResponse(body, media_type="application/x-ndjson", headers={
            "content-disposition": f'attachment; filename="{project}-{kind}.jsonl"'})

    # ------------------------------------------------------------ JSON API
    @app.post("/api/login")
    def api_login(body: LoginBody, request: Request, session: Session = Depends(db)):
        user = service.authenticate(session, body.username, body.password)
        if user is None:
            raise HTTPException(401, "wrong username or password")
        request.session.clear()
        request.session.update(user_id=user.id, csrf=secrets.token_urlsafe(32))
        return {"csrf": request.session["csrf"], "role": user.role}

    @app.post("/api/invite/{token}")
    def api_invite(token: str, body: PasswordBody, session: Session = Depends(db)):
        user = service.accept_invite(session, token, body.password)
        return {"username": user.username}

    @app.get("/api/next")
    def api_next(project: str | None = None, user: User = Depends(current_user), session: Session = Depends(db)):
        chosen = service.get_project(session, project)
        item = service.next_item(session, user, chosen)
        if item is None:
            return Response(status_code=204)
        return service.item_view(item, chosen, user, session)

    @app.post("/api/labels")
    def api_label(body: LabelBody, user: User = Depends(api_user), session: Session = Depends(db)):
        result = service.submit_label(session, user, body.item_id, body.groups, body.flagged, body.seconds)
        return {"label_id": result.label_id, "duplicate": result.duplicate}

    @app.post("/api/skip")
    def api_skip(body: ItemBody, user: User = Depends(api_user), session: Session = Depends(db)):
        service.skip(session, user, body.item_id)
        return {"skipped": body.item_id}

    @app.post("/api/admin/users")
    def api_create_user(body: UserBody, user: User = Depends(api_admin), session: Session = Depends(db)):
        created = service.create_user(session, body.username, body.role)
        return {"username": created.username, "invite": created.invite_token}

    @app.get("/api/admin/stats")
    def api_stats(project: str | None = None, user: User = Depends(admin_user), session: Session = Depends(db)):
        chosen = service.get_project(session, project)
        return {"progress": service.progress(session, chosen),
                "agreement": service.project_agreement(session, chosen).as_dict()}

    @app.get("/healthz")
    def health():
        return {"ok": True}

    return app


def _upload_records(data: bytes, filename: str | None, record_type):
    """Records from an uploaded JSONL file; errors name the file, line and field."""
    import tempfile

    from rlhfkit.data.io import DataError, read_records

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(filename or "upload.jsonl").name
        path.write_bytes(data)
        try:
            return read_records(path, record_type)
        except DataError as exc:
            raise service.FeedbackError(f"{Path(filename or 'upload').name}: {exc.message} "
                                        f"(line {exc.line}, field {exc.field})", 422) from None


def _labeler_plot(stats) -> str | None:
    """Each labeler's τ against the others, as an embedded PNG."""
    if not stats.per_labeler:
        return None
    from rlhfkit.eval.report import png_base64, subplots

    figure, ax = subplots(figsize=(6, 0.4 * len(stats.per_labeler) + 1))
    names = [s.labeler_id for s in stats.per_labeler]
    taus = [0.0 if s.tau != s.tau else s.tau for s in stats.per_labeler]
    ax.barh(names, taus, color=["#c0392b" if s.poor else "#2e86c1" for s in stats.per_labeler])
    ax.axvline(0.2, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("Kendall τ against the other labelers' consensus")
    ax.set_xlim(-1, 1)
    return png_base64(figure, dpi=80)
