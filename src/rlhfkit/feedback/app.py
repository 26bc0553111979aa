"""The labeling web app (FastAPI): labelers rank completions, the admin watches agreement and exports.

Security model:
- Sessions are server-side: the signed, HTTP-only, SameSite=strict cookie (Secure with
  ``secure_cookies``) carries a random token whose SHA-256 is a row of ``web_sessions``; logging out,
  changing the password, a password reset and disabling the account delete the rows, which ends them.
- Every state-changing request needs the session's CSRF token: a hidden form field on forms, the
  ``X-CSRF-Token`` header on JSON calls. JSON bodies of authenticated calls are parsed only after the
  session and the token were checked (read before the database lookup only from a client whose signed
  cookie holds a session token and the matching CSRF token: /api/labels, see ``labeler_call``);
  every body is limited in size before it is read (middleware).
- Logins are throttled per account and per client address (state in the database, so every worker
  process shares it); an unknown username costs the same password hash as a known one.
- Markdown instructions are rendered, then sanitised with an allow-list (nh3); pages load scripts only
  from the app's files, and every response carries a strict Content-Security-Policy, X-Frame-Options,
  nosniff and a Referrer-Policy.
- Labelers see only their own items and work; the admin pages and the export need the admin role.

JSON API (what the labeler page and the simulated labelers use):
    POST /api/login {username, password} → {csrf, role}  POST /api/logout
    GET /api/next?project=NAME → item | 204                GET /api/progress?project=NAME
    POST /api/labels {item_id, groups, flagged, seconds} → {label_id, duplicate}
    POST /api/skip {item_id}   POST /api/undo {project}   POST /api/password {old, new} → {csrf}
    POST /api/invite/{token} {password}
    POST /api/admin/users {username, role} → {invite}      GET /api/admin/stats?project=NAME
    POST /api/admin/users/{name}/disable {disabled}        POST /api/admin/users/{name}/reset → {invite}
    POST /api/admin/items/{id}/reopen → {released}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import AfterValidator, BaseModel, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.middleware.sessions import SessionMiddleware

from rlhfkit.feedback import service
from rlhfkit.feedback.db import Setting, User, session_factory
from rlhfkit.feedback.middleware import BodyLimit, SecurityHeaders

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
# a statistic that is undefined (too few labels yet) shows as a dash
TEMPLATES.env.filters["num"] = lambda v: "–" if v is None or v != v else f"{v:.3f}"

ItemId = Annotated[int, Field(ge=1, le=2**31 - 1)]  # the database's integer range


def _storable(value: str) -> str:
    """Text that every database and the password hash can take: no NUL character (PostgreSQL refuses
    it), no lone surrogate (not encodable as UTF-8; JSON's "\\ud800" makes one)."""
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return value


Text = Annotated[str, AfterValidator(_storable)]


class LoginBody(BaseModel):
    username: Text
    password: Text


class LabelBody(BaseModel):
    item_id: ItemId
    groups: list[list[Text]]
    flagged: list[Text] = []
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class ItemBody(BaseModel):
    item_id: ItemId


class ProjectBody(BaseModel):
    project: Text | None = None


class UserBody(BaseModel):
    username: Text
    role: Text = "labeler"


class ProjectForm(BaseModel):
    name: Text
    criterion: Text
    instructions: Text = ""
    overlap: int = 3
    consensus: Text = "borda"
    gold_rate: float = 0.1


class DisableBody(BaseModel):
    disabled: bool = True


class PasswordBody(BaseModel):
    password: Text


class PasswordChangeBody(BaseModel):
    old: Text
    new: Text


def _secret(sessions: sessionmaker) -> str:
    """The cookie signing key, kept in the database so that cookies survive a restart."""
    with sessions() as db:
        row = db.get(Setting, "session_secret")
        if row is None:
            row = Setting(key="session_secret", value=secrets.token_urlsafe(32))
            db.add(row)
            db.commit()
        return row.value


def json_body(model: type[BaseModel]):
    """A dependency that reads and validates the JSON body. Listed after the session dependency, it
    runs only for an authenticated request: FastAPI itself would parse a body parameter first."""

    async def parse(request: Request) -> BaseModel:
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None

    return parse


# the JSON bodies of authenticated calls, read after the session dependency (list them after it)
PasswordChangeJson = Annotated[PasswordChangeBody, Depends(json_body(PasswordChangeBody))]
ItemJson = Annotated[ItemBody, Depends(json_body(ItemBody))]
ProjectJson = Annotated[ProjectBody, Depends(json_body(ProjectBody))]
UserJson = Annotated[UserBody, Depends(json_body(UserBody))]
DisableJson = Annotated[DisableBody, Depends(json_body(DisableBody))]


def sanitised_markdown(text: str) -> str:
    """Markdown as HTML with only an allow-list of tags and attributes left (no script, event handler,
    iframe, style or javascript: URL); links get rel="noopener noreferrer"."""
    import markdown
    import nh3

    return nh3.clean(markdown.markdown(text), url_schemes={"http", "https", "mailto"})


def _client(request: Request) -> str:
    """The client's address, for login throttling (behind a proxy: run uvicorn with --forwarded-allow-ips)."""
    return request.client.host if request.client else "unknown"


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")


def create_app(db_url: str, secure_cookies: bool = False, threads: int | None = None) -> FastAPI:
    """The app on the database ``db_url``. ``threads``: how many requests of this process run their
    database work at once: the size of the pool that runs the labelers' hot calls, and of the one that
    runs the other sync endpoints and dependencies (anyio's default is 40). The rest wait their turn on
    the event loop, which costs less CPU than 40 threads taking turns at the interpreter lock
    (benchmarks/README.md)."""
    sessions = session_factory(db_url)
    # The labelers' hot calls hop to these threads: a hand-off costs about 15 µs of CPU against anyio's 50
    # (its queue.Queue and Condition), which py-spy put at a tenth of the server's CPU under load.
    hot_threads = ThreadPoolExecutor(threads or 40, thread_name_prefix="labeler-call")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        if threads is not None:
            anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield

    app = FastAPI(title="rlhfkit feedback", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(SessionMiddleware, secret_key=_secret(sessions), same_site="strict",
                       https_only=secure_cookies, max_age=int(service.SESSION_LIFETIME.total_seconds()))
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.state.sessions = sessions

    # Every sync function (dependency or endpoint) costs a hop to a worker thread and back: the
    # dependencies that do no I/O are async, so a request makes two hops (user, endpoint); the labeler's
    # hot calls make one (labeler_call).
    async def db():
        session = sessions()
        try:
            yield session
        finally:
            if session.in_transaction():  # the endpoint failed half-way: the rollback is I/O
                # A limiter of its own, as FastAPI's own teardown of sync dependencies: with every thread
                # of the pool taken by requests that wait for this transaction's (SQLite) write lock, a
                # rollback queued behind them waited out their 30 s busy timeout (500s), again and again.
                await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
            else:
                session.close()

    def csrf_token(request: Request) -> str:
        if "csrf" not in request.session:
            request.session["csrf"] = secrets.token_urlsafe(32)
        return request.session["csrf"]

    def check_csrf(request: Request, given: str | None) -> None:
        expected = request.session.get("csrf")
        if not expected or not given or not secrets.compare_digest(expected, given):
            raise HTTPException(403, "missing or wrong CSRF token")

    def begin_session(request: Request, session: Session, user: User, token: str | None = None) -> str:
        """Log the client in as ``user`` with a new session (``token``, or one started here) and CSRF
        token; the client's previous session ends. Returns the CSRF token."""
        if "token" in request.session:
            service.end_session(session, request.session["token"])
        request.session.clear()
        request.session.update(token=token or service.start_session(session, user), csrf=secrets.token_urlsafe(32))
        return request.session["csrf"]

    def end_session(request: Request, session: Session) -> None:
        if "token" in request.session:
            service.end_session(session, request.session["token"])
        request.session.clear()

    def current_user(request: Request, session: Session = Depends(db)) -> User:
        user = service.session_user(session, request.session.get("token"))
        session.commit()  # the endpoint runs in another thread: end the (SQLite: write-locked) transaction
        if user is None:
            raise HTTPException(401, "log in first")
        return user

    async def labeler_call(request: Request, work: Callable[[Session, service.Labeler, service.ProjectRules | None,
                                                           BaseModel | None], dict | Response],
                           body_model: type[BaseModel] | None = None, project: str | None = None,
                           in_project: bool = False) -> Response:
        """A labeler's hot call (/api/next, /api/labels) in one hop to a worker thread and one transaction:
        the session lookup (401) — with the ``project`` when ``in_project`` (404), in the same statement —
        then for a call with a body the CSRF token (403) and the parsed body (422), then
        ``work(session, labeler, project rules or None, body)``, whose dict is the JSON answer. The
        dependencies of the other endpoints cost two hops and two transactions; py-spy put the hops and
        the lookup's own transaction at about a quarter of the server's CPU (benchmarks/README.md).

        The body is read before the lookup only from a client whose signed cookie holds a session token
        and whose X-CSRF-Token matches it (an anonymous body is never read; BodyLimit caps any body);
        it is parsed only after the session was found live. A wrong token costs a lookup of its own,
        so that a dead session still answers 401 before the 403."""
        token = request.session.get("token")
        if not token:
            raise HTTPException(401, "log in first")
        body = None
        if body_model is not None:
            try:
                check_csrf(request, request.headers.get("x-csrf-token"))
            except HTTPException:
                await run_in_threadpool(lookup_only, token)  # a dead session: 401 before the 403
                raise
            body = await request.body()

        def in_thread():
            with sessions() as session:
                if in_project:
                    user, rules = service.session_labeler_and_project(session, token, project)
                else:
                    user, rules = service.session_labeler(session, token), None
                parsed = None
                if body_model is not None:
                    try:
                        parsed = body_model.model_validate_json(body)
                    except ValidationError as exc:
                        raise RequestValidationError(exc.errors(include_url=False)) from None
                return work(session, user, rules, parsed)

        answer = await asyncio.get_running_loop().run_in_executor(hot_threads, in_thread)
        return answer if isinstance(answer, Response) else JSONResponse(answer)

    def lookup_only(token: str) -> None:
        """401 for a dead session (the caller answers 403 for a live one)."""
        with sessions() as session:
            service.session_labeler(session, token)

    async def admin_user(user: User = Depends(current_user)) -> User:
        if user.role != "admin":
            raise HTTPException(403, "admins only")
        return user

    async def api_user(request: Request, user: User = Depends(current_user)) -> User:
        """A JSON call that changes state: the CSRF token must come in the X-CSRF-Token header."""
        check_csrf(request, request.headers.get("x-csrf-token"))
        return user

    async def api_admin(request: Request, user: User = Depends(admin_user)) -> User:
        check_csrf(request, request.headers.get("x-csrf-token"))
        return user

    async def form_admin(request: Request, csrf: str = Form(""), user: User = Depends(admin_user)) -> User:
        check_csrf(request, csrf)
        return user

    def error_response(request: Request, status: int, reason: str, retry_after: int | None = None) -> Response:
        if status == 401 and _wants_html(request):
            return RedirectResponse("/login", 303)
        if _wants_html(request):
            titles = {400: "That request was not right", 403: "Not allowed", 404: "Not found", 409: "Conflict",
                      413: "Too large", 422: "Something in the form was not right", 429: "Too many attempts"}
            return TEMPLATES.TemplateResponse(request, "error.html", {
                "status": status, "title": titles.get(status, "Something went wrong"), "reason": reason},
                status_code=status)
        return JSONResponse({"detail": reason}, status_code=status,
                            headers={"retry-after": str(retry_after)} if retry_after else None)

    @app.exception_handler(service.FeedbackError)
    async def _feedback_error(request: Request, exc: service.FeedbackError) -> Response:
        return error_response(request, exc.status, exc.message, exc.retry_after)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(request, exc.status_code, str(exc.detail))

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> Response:
        """What only the database refuses (PostgreSQL: a NUL character in a name, a number out of its
        range) is the client's input, not a server fault."""
        return error_response(request, 422, "a value of this request cannot be stored: it contains a NUL "
                                            "character or a number out of range; remove it and send again")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        if not _wants_html(request):  # the offending input is not echoed (it may be NaN, not JSON)
            return JSONResponse({"detail": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                                            for e in exc.errors()]}, status_code=422)
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return error_response(request, 422, reasons)

    # ------------------------------------------------------------ pages
    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request):
        return TEMPLATES.TemplateResponse(request, "login.html", {"csrf": csrf_token(request)})

    @app.post("/login")
    def login_form(request: Request, username: str = Form(...), password: str = Form(...), csrf: str = Form(""),
                   session: Session = Depends(db)):
        check_csrf(request, csrf)
        try:
            user, token = service.log_in(session, username, password, _client(request))
        except service.FeedbackError as exc:  # shown on the page, never taken from the URL (no spoofed messages)
            return TEMPLATES.TemplateResponse(request, "login.html", {
                "csrf": csrf_token(request), "error": exc.message}, status_code=exc.status)
        begin_session(request, session, user, token)
        return RedirectResponse("/admin" if user.role == "admin" else "/", 303)

    @app.post("/logout")
    def logout(request: Request, csrf: str = Form(""), session: Session = Depends(db)):
        check_csrf(request, csrf)
        end_session(request, session)
        return RedirectResponse("/login", 303)

    @app.get("/invite/{token}", response_class=HTMLResponse)
    def invite_page(request: Request, token: str, session: Session = Depends(db)):
        return TEMPLATES.TemplateResponse(request, "invite.html", {
            "csrf": csrf_token(request), "token": token, "username": service.invited_user(session, token).username,
            "min_length": service.MIN_PASSWORD_LENGTH})

    @app.post("/invite/{token}")
    def invite_form(request: Request, token: str, password: str = Form(...), confirm: str = Form(...),
                    csrf: str = Form(""), session: Session = Depends(db)):
        check_csrf(request, csrf)
        if password != confirm:
            raise service.FeedbackError("the two passwords differ: type the same password twice", 400)
        user = service.accept_invite(session, token, password)
        begin_session(request, session, user)
        return RedirectResponse("/", 303)

    @app.get("/account", response_class=HTMLResponse)
    def account_page(request: Request, changed: bool = False, user: User = Depends(current_user)):
        return TEMPLATES.TemplateResponse(request, "account.html", {
            "csrf": csrf_token(request), "user": user, "changed": changed,
            "min_length": service.MIN_PASSWORD_LENGTH})

    @app.post("/account/password")
    def password_form(request: Request, old: str = Form(...), new: str = Form(...), confirm: str = Form(...),
                      csrf: str = Form(""), user: User = Depends(current_user), session: Session = Depends(db)):
        check_csrf(request, csrf)
        if new != confirm:
            raise service.FeedbackError("the two new passwords differ: type the same password twice", 400)
        service.change_password(session, user, old, new)
        begin_session(request, session, user)
        return RedirectResponse("/account?changed=true", 303)

    @app.get("/", response_class=HTMLResponse)
    def label_page(request: Request, project: str | None = None, user: User = Depends(current_user),
                   session: Session = Depends(db)):
        chosen = service.get_project(session, project)
        return TEMPLATES.TemplateResponse(request, "label.html", {
            "csrf": csrf_token(request), "user": user, "project": chosen,
            "instructions": sanitised_markdown(chosen.instructions)})

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
                        "plot": _labeler_plot(stats), "bias": service.position_bias(session, chosen),
                        "overview": service.assignment_overview(session, chosen)}
        return TEMPLATES.TemplateResponse(request, "admin.html", context)

    @app.post("/admin/projects")
    async def create_project_form(request: Request, user: User = Depends(admin_user), session: Session = Depends(db)):
        """The form is read only here, after the admin's session was checked (a form parameter would make
        FastAPI parse the whole upload, up to its 256 MiB limit, for an anonymous client too)."""
        from rlhfkit.data.records import Completion, Ranking

        async with request.form(max_files=2, max_fields=10) as form:
            check_csrf(request, form.get("csrf") if isinstance(form.get("csrf"), str) else None)
            try:
                fields = ProjectForm.model_validate({k: v for k, v in form.items() if isinstance(v, str)})
            except ValidationError as exc:
                raise RequestValidationError([{**e, "loc": ("form", *e["loc"])}
                                              for e in exc.errors(include_url=False)]) from None
            completions, gold = form.get("completions"), form.get("gold")
            records = (_upload_records(await completions.read(), completions.filename, Completion)
                       if isinstance(completions, StarletteUpload) else [])
            answers = (_upload_records(await gold.read(), gold.filename, Ranking)
                       if isinstance(gold, StarletteUpload) and gold.filename else [])
        service.create_project(session, fields.name, fields.criterion, records, fields.instructions, fields.overlap,
                               fields.consensus, answers, fields.gold_rate)
        return RedirectResponse(f"/admin?project={quote(fields.name)}", 303)

    @app.post("/admin/users")
    def create_user_form(username: str = Form(...), role: str = Form("labeler"), user: User = Depends(form_admin),
                         session: Session = Depends(db)):
        service.create_user(session, username, role)
        return RedirectResponse("/admin", 303)

    @app.post("/admin/users/{username:path}/disable")
    def disable_user_form(username: str, disabled: bool = Form(True), user: User = Depends(form_admin),
                          session: Session = Depends(db)):
        service.set_disabled(session, username, disabled, user)
        return RedirectResponse("/admin", 303)

    @app.post("/admin/users/{username:path}/reset")
    def reset_password_form(username: str, user: User = Depends(form_admin), session: Session = Depends(db)):
        service.reset_password(session, username)
        return RedirectResponse("/admin", 303)

    @app.post("/admin/items/{item_id}/reopen")
    def reopen_item_form(item_id: ItemId, user: User = Depends(form_admin), session: Session = Depends(db)):
        service.reopen_item(session, item_id)
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
        return PlainTextResponse(body, media_type="application/x-ndjson",
                                 headers={"content-disposition": _attachment(f"{project}-{kind}.jsonl")})

    # ------------------------------------------------------------ JSON API
    @app.post("/api/login")
    def api_login(body: LoginBody, request: Request, session: Session = Depends(db)):
        user, token = service.log_in(session, body.username, body.password, _client(request))
        return {"csrf": begin_session(request, session, user, token), "role": user.role}

    @app.post("/api/logout")
    def api_logout(request: Request, user: User = Depends(api_user), session: Session = Depends(db)):
        end_session(request, session)
        return {"logged_out": user.username}

    @app.post("/api/password")
    def api_password(*, request: Request, user: User = Depends(api_user),
                     body: PasswordChangeJson,
                     session: Session = Depends(db)):
        service.change_password(session, user, body.old, body.new)
        return {"csrf": begin_session(request, session, user)}

    @app.post("/api/invite/{token}")
    def api_invite(token: str, body: PasswordBody, session: Session = Depends(db)):
        user = service.accept_invite(session, token, body.password)
        return {"username": user.username}

    @app.get("/api/next")
    async def api_next(request: Request, project: str | None = None) -> Response:
        def work(session: Session, user: service.Labeler, rules: service.ProjectRules, _body) -> dict | Response:
            item = service.next_item(session, user, rules)
            return Response(status_code=204) if item is None else service.item_view(item, rules, user)

        return await labeler_call(request, work, project=project, in_project=True)

    @app.get("/api/progress")
    def api_progress(project: str | None = None, user: User = Depends(current_user),
                     session: Session = Depends(db)):
        return service.labeler_progress(session, user, service.get_project(session, project))

    @app.post("/api/labels")
    async def api_label(request: Request) -> Response:
        def work(session: Session, user: service.Labeler, _rules, body: LabelBody) -> dict:
            result = service.submit_label(session, user, body.item_id, body.groups, body.flagged, body.seconds)
            return {"label_id": result.label_id, "duplicate": result.duplicate}

        return await labeler_call(request, work, LabelBody)

    @app.post("/api/skip")
    def api_skip(*, user: User = Depends(api_user), body: ItemJson,
                 session: Session = Depends(db)):
        service.skip(session, user, body.item_id)
        return {"skipped": body.item_id}

    @app.post("/api/undo")
    def api_undo(*, user: User = Depends(api_user), body: ProjectJson,
                 session: Session = Depends(db)):
        return {"reopened": service.undo_last_label(session, user, service.get_project(session, body.project))}

    @app.post("/api/admin/users")
    def api_create_user(*, user: User = Depends(api_admin), body: UserJson,
                        session: Session = Depends(db)):
        created = service.create_user(session, body.username, body.role)
        return {"username": created.username, "invite": created.invite_token}

    @app.post("/api/admin/users/{username:path}/disable")
    def api_disable_user(*, username: str, user: User = Depends(api_admin),
                         body: DisableJson, session: Session = Depends(db)):
        changed = service.set_disabled(session, username, body.disabled, user)
        return {"username": changed.username, "disabled": changed.disabled}

    @app.post("/api/admin/users/{username:path}/reset")
    def api_reset_password(username: str, user: User = Depends(api_admin), session: Session = Depends(db)):
        return {"invite": service.reset_password(session, username)}

    @app.post("/api/admin/items/{item_id}/reopen")
    def api_reopen_item(item_id: ItemId, user: User = Depends(api_admin), session: Session = Depends(db)):
        return {"released": service.reopen_item(session, item_id)}

    @app.get("/api/admin/stats")
    def api_stats(project: str | None = None, user: User = Depends(admin_user), session: Session = Depends(db)):
        chosen = service.get_project(session, project)
        return {"progress": service.progress(session, chosen),
                "agreement": service.project_agreement(session, chosen).as_dict(),
                "position_bias": service.position_bias(session, chosen),
                **service.assignment_overview(session, chosen)}

    @app.get("/healthz")
    def health():
        return {"ok": True}

    # for the routers of other areas (rlhfkit.personal.api): the same sessions, accounts and CSRF checks
    app.state.dependencies = {"db": db, "user": current_user, "api_user": api_user, "csrf_token": csrf_token}
    return app


def _attachment(filename: str) -> str:
    """Content-Disposition for any file name: an ASCII stand-in, and the real name per RFC 5987."""
    fallback = re.sub(r"[^A-Za-z0-9._-]", "_", filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _upload_records(data: bytes, filename: str | None, record_type):
    """Records from an uploaded JSONL file; errors name the file, line and field. The client's file name
    is only shown, never used as a path (".", "..", "/", NUL or 300 bytes are all names a client can send)."""
    import tempfile

    from rlhfkit.data.io import DataError, read_records

    name = Path(filename or "").name or "upload.jsonl"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise service.FeedbackError(f"{name}: not UTF-8 text (byte {exc.start}); save the file as UTF-8", 422) from None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "upload.jsonl"
        path.write_bytes(data)
        try:
            return read_records(path, record_type)
        except DataError as exc:
            raise service.FeedbackError(f"{name}: {exc.message} (line {exc.line}, field {exc.field})", 422) from None


def _labeler_plot(stats) -> str | None:
    """Each labeler's τ against the others, as an embedded PNG."""
    if not stats.per_labeler:
        return None
    from rlhfkit.eval.report import png_base64, subplots

    figure, ax = subplots(figsize=(6, 0.4 * len(stats.per_labeler) + 1))
    names = [s.labeler_id.replace("$", r"\$") for s in stats.per_labeler]  # "$" would start matplotlib's math
    taus = [0.0 if s.tau != s.tau else s.tau for s in stats.per_labeler]
    ax.barh(names, taus, color=["#c0392b" if s.poor else "#2e86c1" for s in stats.per_labeler])
    ax.axvline(0.2, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("Kendall τ against the other labelers' consensus")
    ax.set_xlim(-1, 1)
    return png_base64(figure, dpi=80)
