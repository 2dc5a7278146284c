"""The analyst review console: server-rendered pages over the case store and the accounts.

    /console/login, /console/logout     sign in and out (accounts: ``fraudflow users``)
    /console/queue                      the work list: counts, filters, take next, bulk close
    /console/cases/{case_id}            a case: verdict, escalate, reassign
    /console/audit                      the analysts' actions (supervisors and admins)

Security. A session is a random token in a cookie (HttpOnly, SameSite=Strict, Secure when the
request came over https), stored server-side (``UserStore``) with an expiry. Every POST carries
the session's CSRF token in a hidden field; the sign-in form, made before any session exists,
carries one matched against a short-lived cookie of its own (double submit). The decision API's
keys are not read here and the console's cookie is not read by the API: neither opens the
other. Roles are checked here, on the server, for every action. Jinja2 escapes all output.

Verdicts become labels through ``LabelSink``: the service's own ``label``, the function behind
``POST /v1/labels``, so the feature state and the audit log see a console verdict exactly as
they see a posted label. A label is owed from before its verdict is written until it is
recorded (``CaseStore.mark_label_pending``): one that fails (the state store down) or is cut
short (the process dies) is retried after the next verdict, every ``LABEL_RETRY_SECONDS`` and
at start (``_Console.retry_labels``).

A case page shows the card's last 30 days of decided transactions (with a chart of their
amounts), the terminal's known frauds of that time and the card's earlier cases: the history
is followed from the audit log into the case store (``fraudflow.serve.history``).

The stores are opened on first use, not at start-up: a service whose console nobody uses
creates no files for it. They are SQLite files beside the audit log, or with ``--cases
postgresql://...`` one PostgreSQL database that several replicas share.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from fraudflow.errors import DataError, ServeError
from fraudflow.serve.cases import Case, CaseFilter, CaseStore, Status, Verdict
from fraudflow.serve.charts import amounts_chart
from fraudflow.serve.history import HISTORY_DAYS, follow_audit
from fraudflow.serve.metrics import CASE_GAUGES, ServiceMetrics
from fraudflow.serve.schemas import LabelIn
from fraudflow.serve.settings import ServeSettings
from fraudflow.serve.users import LoginRefused, LoginThrottled, Session, UserStore, users_path_for
from fraudflow.serve.wording import in_words

__all__ = ["ConsoleStores", "LabelSink", "build_console_router", "now_us"]

SESSION_COOKIE = "fraudflow_console"
LOGIN_COOKIE = "fraudflow_console_login"
SUPERVISORS = frozenset({"supervisor", "admin"})
PAGE_SIZE = 50
MAX_FORM_BYTES = 64 * 1024
LABEL_RETRY_SECONDS = 30.0  # owed labels are retried this often (and after each verdict)
HISTORY_FOLLOW_SECONDS = 5.0  # the audit log is followed into the history this often
_DAY_US = 86_400 * 1_000_000
log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
_US = 1_000_000
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "Referrer-Policy": "same-origin",
}


class LabelSink(Protocol):
    """Where a verdict's label goes: ``DecisionService.label``, as ``POST /v1/labels``."""

    async def label(self, label: LabelIn) -> bytes: ...


def now_us() -> int:
    return time.time_ns() // 1_000


class ConsoleStores:
    """The case store and the accounts of ``settings``, opened on first use."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings

    @functools.cached_property
    def cases(self) -> CaseStore:
        s = self.settings
        return CaseStore(
            s.cases_target,
            sla_seconds=s.case_sla_seconds,
            hold_seconds=s.case_hold_seconds,
            open_block_cases=s.open_block_cases,
        )

    @functools.cached_property
    def users(self) -> UserStore:
        s = self.settings
        where = s.cases if s.cases is not None else users_path_for(s.audit_path)
        return UserStore(where, session_seconds=s.console_session_seconds)

    def started(self) -> bool:
        """Whether the case store exists (a console nobody used has none, and makes none; a
        PostgreSQL database is there from the start)."""
        s = self.settings
        return "cases" in self.__dict__ or s.cases is not None or s.cases_path.is_file()

    def gauges(self) -> dict[str, float] | None:
        """The ``fraudflow_cases_*`` gauges now, from the shared store; None: no store."""
        if not self.started():
            return None
        g = self.cases.gauges(now_us())
        values = [g.open, g.oldest_open_age_seconds, g.overdue]
        return dict(zip(CASE_GAUGES, values, strict=True))

    def follow_audit(self) -> None:
        """Copy the audit log's new decisions and labels into the case pages' history."""
        if self.started():
            follow_audit(self.settings.audit_path, self.cases, now_us=now_us())

    def close(self) -> None:
        """Close the stores opened (at shut-down: their files stay open until then)."""
        for name in ("cases", "users"):
            store = self.__dict__.get(name)  # the cached_property's value, if it ran
            if store is not None:
                store.close()


_templates = Environment(
    loader=FileSystemLoader(_HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(us: int | None) -> str:
    if us is None:
        return ""
    return datetime.fromtimestamp(us / _US, UTC).strftime("%Y-%m-%d %H:%M")


def _age(us: int) -> str:
    minutes = max(0, us) // (60 * _US)
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h" if hours < 48 else f"{hours // 24} d"


_templates.filters["when"] = _when
_templates.filters["age"] = _age
_templates.filters["in_words"] = in_words


class _Refused(Exception):
    """A request the console answers with a page of its own (status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def build_console_router(
    stores: ConsoleStores,
    *,
    labels: LabelSink,
    metrics: ServiceMetrics | None = None,
    clock: Callable[[], int] = now_us,
) -> APIRouter:
    """The console's routes; ``labels`` records verdicts as ``POST /v1/labels`` does;
    ``metrics`` counts the verdicts and their time (``fraudflow_case_*``)."""
    router = APIRouter(prefix="/console", include_in_schema=False)
    console = _Console(stores, labels, clock, metrics)
    router.add_api_route("", console.home, methods=["GET"])
    router.add_api_route("/static/console.css", console.css, methods=["GET"])
    router.add_api_route("/login", console.login_form, methods=["GET"])
    router.add_api_route("/login", console.login, methods=["POST"])
    router.add_api_route("/logout", console.logout_form, methods=["GET"])
    router.add_api_route("/logout", console.logout, methods=["POST"])
    router.add_api_route("/queue", console.queue, methods=["GET"])
    router.add_api_route("/take", console.take, methods=["POST"])
    router.add_api_route("/bulk-close", console.bulk_close, methods=["POST"])
    router.add_api_route("/cases/{case_id}", console.case, methods=["GET"])
    router.add_api_route("/cases/{case_id}/verdict", console.verdict, methods=["POST"])
    router.add_api_route("/cases/{case_id}/escalate", console.escalate, methods=["POST"])
    router.add_api_route("/cases/{case_id}/reassign", console.reassign, methods=["POST"])
    router.add_api_route("/audit", console.audit, methods=["GET"])
    router.console = console  # type: ignore[attr-defined]  # for tests and the app
    return router


def _page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _templates.get_template(name).render(**context)
    return HTMLResponse(html, status, headers=_HEADERS)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, 303, headers=_HEADERS)


def _guarded(
    handler: Callable[..., Awaitable[Response]],
) -> Callable[..., Awaitable[Response]]:
    """Turns ``_Refused`` and the store's ``DataError`` into a page with the message."""

    @functools.wraps(handler)
    async def wrapper(self: _Console, request: Request, *args: Any, **kw: Any) -> Response:
        try:
            return await handler(self, request, *args, **kw)
        except _SignIn:
            return _redirect("/console/login")
        except _Refused as exc:
            session = request.scope.get("state", {}).get("console_session")
            return _page("message.html", exc.status, message=exc.message, session=session)
        except DataError as exc:
            session = request.scope.get("state", {}).get("console_session")
            status = 404 if "does not exist" in str(exc) else 409
            return _page("message.html", status, message=str(exc), session=session)

    return wrapper


class _Console:
    def __init__(
        self,
        stores: ConsoleStores,
        labels: LabelSink,
        clock: Callable[[], int],
        metrics: ServiceMetrics | None = None,
    ):
        self.stores = stores
        self.labels = labels
        self.clock = clock
        self.metrics = metrics

    # ---------------------------------------------------------------- helpers

    async def _session(self, request: Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        session = await asyncio.to_thread(self.stores.users.session, token, self.clock())
        request.scope.setdefault("state", {})["console_session"] = session
        return session

    async def _signed_in(self, request: Request, *, role: frozenset[str] | None = None) -> Session:
        """The session of a page request: ``_SignIn`` (a redirect) for none, 403 for a role."""
        session = await self._session(request)
        if session is None:
            raise _SignIn()
        _require_role(session, role)
        return session

    async def _posted(
        self, request: Request, *, role: frozenset[str] | None = None
    ) -> tuple[Session, dict[str, list[str]]]:
        """The session and form of a POST: signed in (401), CSRF token (403), role (403)."""
        session = await self._session(request)
        if session is None:
            raise _Refused(401, "sign in first")
        form = await _form(request)
        if not session.csrf_matches(_one(form, "csrf")):
            raise _Refused(403, "missing or invalid CSRF token: reload the page and try again")
        _require_role(session, role)
        return session, form

    async def _store(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    # ---------------------------------------------------------------- pages

    async def home(self, request: Request) -> Response:
        return _redirect("/console/queue")

    async def css(self) -> Response:
        return Response(_css(), media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    async def login_form(self, request: Request) -> Response:
        if await self._session(request) is not None:
            return _redirect("/console/queue")
        return self._login_page(request, 200, None)

    def _login_page(self, request: Request, status: int, error: str | None) -> Response:
        csrf = secrets.token_urlsafe(32)
        response = _page("login.html", status, csrf=csrf, error=error, session=None)
        _set_cookie(request, response, LOGIN_COOKIE, csrf, max_age=3_600)
        return response

    @_guarded
    async def login(self, request: Request) -> Response:
        form = await _form(request)
        presented, expected = _one(form, "csrf"), request.cookies.get(LOGIN_COOKIE)
        if not presented or not expected or not hmac.compare_digest(presented, expected):
            raise _Refused(403, "missing or invalid CSRF token: reload the page and try again")
        name, password = _one(form, "username") or "", _one(form, "password") or ""
        users, now = self.stores.users, self.clock()
        try:
            user = await self._store(users.authenticate, name, password, now)
        except LoginRefused as exc:
            await self._store(self.stores.cases.record, name, "login_refused", str(exc), now)
            status = 429 if isinstance(exc, LoginThrottled) else 401
            return self._login_page(request, status, str(exc))
        session = await self._store(users.open_session, user, now)
        await self._store(self.stores.cases.record, user.username, "login", "", now)
        response = _redirect("/console/queue")
        _set_cookie(request, response, SESSION_COOKIE, session.token, max_age=None)
        response.delete_cookie(LOGIN_COOKIE, path="/console")
        return response

    @_guarded
    async def logout_form(self, request: Request) -> Response:
        session = await self._signed_in(request)
        return _page("logout.html", session=session)

    @_guarded
    async def logout(self, request: Request) -> Response:
        session, _ = await self._posted(request)
        await self._store(self.stores.users.close_session, session.token)
        await self._store(
            self.stores.cases.record, session.user.username, "logout", "", self.clock()
        )
        response = _redirect("/console/login")
        response.delete_cookie(SESSION_COOKIE, path="/console")
        return response

    @_guarded
    async def queue(self, request: Request) -> Response:
        session = await self._signed_in(request)
        now = self.clock()
        where, shown = _filters(request.query_params, now)
        offset = max(0, _int(request.query_params.get("offset")) or 0)
        cases = self.stores.cases
        rows = await self._store(cases.queue, where, limit=PAGE_SIZE + 1, offset=offset)
        counts = await self._store(cases.counts, now)
        more = len(rows) > PAGE_SIZE
        return _page(
            "queue.html",
            session=session,
            cases=rows[:PAGE_SIZE],
            counts=counts,
            now=now,
            filters=shown,
            supervisor=session.user.role in SUPERVISORS,
            message=request.query_params.get("message"),
            next_page=(urlencode(shown | {"offset": offset + PAGE_SIZE}) if more else None),
        )

    @_guarded
    async def take(self, request: Request) -> Response:
        session, _ = await self._posted(request)
        case = await self._store(self.stores.cases.take_next, session.user.username, self.clock())
        if case is None:
            return _redirect("/console/queue?" + urlencode({"message": "no case to take"}))
        return _redirect(f"/console/cases/{case.case_id}")

    @_guarded
    async def case(self, request: Request, case_id: int) -> Response:
        session = await self._signed_in(request)
        now, cases = self.clock(), self.stores.cases
        case: Case = await self._store(cases.view, case_id, session.user.username, now)
        earlier = await self._store(cases.card_cases, case.customer_id, before_us=case.opened_us)
        users = await self._store(self.stores.users.list)
        history, frauds = await self._store(self._history, case)
        return _page(
            "case.html",
            session=session,
            case=case,
            now=now,
            history=history,
            chart=amounts_chart(history, current=case.transaction_id),
            frauds=frauds,
            history_days=HISTORY_DAYS,
            earlier=earlier,
            held_by=case.held_by(now),
            mine=case.held_by(now) == session.user.username,
            supervisor=session.user.role in SUPERVISORS,
            analysts=[u.username for u in users if not u.disabled],
            message=request.query_params.get("message"),
        )

    def _history(self, case: Case) -> tuple[list[Any], list[Any]]:
        """The card's decided transactions of the ``HISTORY_DAYS`` before the case's (and
        since), and the terminal's known frauds of that time; followed from the audit log
        first, so the case's own transaction is there."""
        self.stores.follow_audit()
        cases = self.stores.cases
        own = cases.decided(case.transaction_id)
        since = (case.opened_us if own is None else own.t_us) - HISTORY_DAYS * _DAY_US
        history = cases.card_history(case.customer_id, since_us=since)
        return history, cases.terminal_frauds(case.terminal_id, since_us=since)

    @_guarded
    async def verdict(self, request: Request, case_id: int) -> Response:
        session, form = await self._posted(request)
        outcome, note = _one(form, "outcome") or "", _note(form)
        if outcome not in ("fraud", "not_fraud"):
            raise _Refused(422, f"a verdict is fraud or not_fraud, however got {outcome!r}")
        cases, now = self.stores.cases, self.clock()
        await self._store(cases.mark_label_pending, [case_id], now)
        verdict = await self._store(
            cases.verdict, case_id, session.user.username, outcome, note, now
        )
        await self._counted([case_id])
        await self._label(case_id, verdict)
        await self.retry_labels()
        return _redirect("/console/queue?" + urlencode({"message": f"case {case_id} closed"}))

    async def _label(self, case_id: int, verdict: Verdict) -> None:
        """Record the verdict's label; if that fails, it stays owed and is retried."""
        if not await self._try_label(case_id, verdict):
            raise _Refused(
                503,
                f"the verdict is saved but its label could not be recorded yet: it will be "
                f"retried (transaction {verdict.transaction_id})",
            )

    async def _try_label(self, case_id: int, verdict: Verdict) -> bool:
        label = LabelIn(transaction_id=verdict.transaction_id, is_fraud=verdict.is_fraud)
        try:
            await self.labels.label(label)
        except ServeError:  # logged and counted by the service
            return False
        await self._store(self.stores.cases.label_recorded, case_id)
        return True

    async def retry_labels(self) -> tuple[int, bool]:
        """Record the labels still owed (oldest first) until one fails: how many were
        recorded, and whether any is still owed."""
        if not self.stores.started():
            return 0, False
        owed = await self._store(self.stores.cases.pending_labels)
        for done, (case_id, verdict) in enumerate(owed):
            if not await self._try_label(case_id, verdict):
                return done, True
        return len(owed), False

    async def keep_up(self) -> None:
        """Background work, until cancelled: the history (every ``HISTORY_FOLLOW_SECONDS``)
        and owed labels: at once, then every ``LABEL_RETRY_SECONDS``; after a failure
        (the service still loading, the state store down) sooner, backing off to that."""
        wait = retry_in = 0.0
        while True:
            try:
                if retry_in <= 0:
                    _, left = await self.retry_labels()
                    wait = min(2 * wait, LABEL_RETRY_SECONDS) if left else LABEL_RETRY_SECONDS
                    wait = max(wait, HISTORY_FOLLOW_SECONDS)
                    retry_in = wait
                await asyncio.to_thread(self.stores.follow_audit)
            except Exception:  # a store's failure must not end the loop
                log.exception("the review console's background work failed")
            await asyncio.sleep(HISTORY_FOLLOW_SECONDS)
            retry_in -= HISTORY_FOLLOW_SECONDS

    async def _counted(self, case_ids: list[int]) -> None:
        """Count the verdicts of ``case_ids`` (now closed) and their time since opening."""
        if self.metrics is None:
            return
        for case_id in case_ids:
            case = await self._store(self.stores.cases.get, case_id)
            if case.outcome is not None and case.closed_us is not None:
                self.metrics.case_verdicts.labels(outcome=case.outcome).inc()
                seconds = max(0, case.closed_us - case.opened_us) / _US
                self.metrics.case_time_to_verdict.observe(seconds)

    @_guarded
    async def escalate(self, request: Request, case_id: int) -> Response:
        session, form = await self._posted(request)
        note, user = _note(form), session.user.username
        await self._store(self.stores.cases.escalate, case_id, user, note, self.clock())
        return _redirect("/console/queue?" + urlencode({"message": f"case {case_id} escalated"}))

    @_guarded
    async def reassign(self, request: Request, case_id: int) -> Response:
        session, form = await self._posted(request, role=SUPERVISORS)
        to_user = _one(form, "to_user") or ""
        await self._store(self.stores.users.get, to_user)  # DataError if unknown
        cases = self.stores.cases
        await self._store(
            cases.reassign, case_id, to_user, by=session.user.username, now_us=self.clock()
        )
        return _redirect(
            f"/console/cases/{case_id}?" + urlencode({"message": f"given to {to_user}"})
        )

    @_guarded
    async def bulk_close(self, request: Request) -> Response:
        session, form = await self._posted(request, role=SUPERVISORS)
        ids = [i for i in (_int(v) for v in form.get("case_id", [])) if i is not None]
        outcome, note = _one(form, "outcome") or "", _note(form)
        if outcome not in ("fraud", "not_fraud"):
            raise _Refused(422, f"a verdict is fraud or not_fraud, however got {outcome!r}")
        if not ids:
            raise _Refused(422, "tick the cases to close")
        cases, now = self.stores.cases, self.clock()
        await self._store(cases.mark_label_pending, ids, now)
        verdicts = await self._store(
            cases.bulk_close, ids, outcome, note, session.user.username, now
        )
        closed = await self._store(_closed_now, cases, ids, now)
        await self._counted(closed)
        _, left = await self.retry_labels()  # the owed labels, these ones among them
        message = f"{len(verdicts)} cases closed"
        if left:
            message += "; some labels could not be recorded yet: they will be retried"
        return _redirect("/console/queue?" + urlencode({"message": message}))

    @_guarded
    async def audit(self, request: Request) -> Response:
        session = await self._signed_in(request, role=SUPERVISORS)
        events = await self._store(self.stores.cases.events)
        await self._store(
            self.stores.cases.record, session.user.username, "view_audit", "", self.clock()
        )
        return _page("audit.html", session=session, events=list(reversed(events[-500:])))


def _closed_now(cases: CaseStore, case_ids: list[int], now: int) -> list[int]:
    """Which of ``case_ids`` were closed at ``now`` (by this bulk close)."""
    return [i for i in case_ids if cases.get(i).closed_us == now]


class _SignIn(Exception):
    """No session: a page redirects to the sign-in form."""


def _require_role(session: Session, role: frozenset[str] | None) -> None:
    if role is not None and session.user.role not in role:
        raise _Refused(
            403,
            f"this needs the role {' or '.join(sorted(role))}, however you are {session.user.role}",
        )


async def _form(request: Request) -> dict[str, list[str]]:
    """An ``application/x-www-form-urlencoded`` body (the console's forms), at most 64 KiB."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise _Refused(413, "form too large")
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def _note(form: dict[str, list[str]]) -> str:
    note = (_one(form, "note") or "").strip()
    if not note:
        raise _Refused(422, "a note is required to close or escalate a case")
    return note


def _one(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _int(text: str | None) -> int | None:
    try:
        return None if text is None or text == "" else int(text)
    except ValueError:
        return None


def _float(text: str | None) -> float | None:
    try:
        return None if text is None or text == "" else float(text)
    except ValueError:
        return None


_STATUSES: dict[str, Status | None] = {
    "open": "open", "escalated": "escalated", "closed": "closed", "all": None
}  # fmt: skip


def _filters(query: Any, now: int) -> tuple[CaseFilter, dict[str, str]]:
    """The queue's filters from the query string, and their values to show in the form."""
    status = query.get("status") if query.get("status") in _STATUSES else "open"
    min_age_hours = _float(query.get("min_age_hours"))
    where = CaseFilter(
        status=_STATUSES[status],
        rule=query.get("rule") or None,
        min_amount=_float(query.get("min_amount")),
        max_amount=_float(query.get("max_amount")),
        opened_before_us=None if min_age_hours is None else now - int(min_age_hours * 3_600 * _US),
        assignee=query.get("assignee") or None,
    )
    names = ("status", "rule", "min_amount", "max_amount", "min_age_hours", "assignee")
    shown = {n: query.get(n) or "" for n in names}
    shown["status"] = status
    return where, shown


def _set_cookie(
    request: Request, response: Response, name: str, value: str, *, max_age: int | None
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


@functools.cache
def _css() -> str:
    return (_HERE / "static" / "console.css").read_text()
