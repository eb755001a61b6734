"""Who may change what: the token, sessions, CSRF and cross-site checks.

Reading needs nothing (the dashboard binds to loopback by default). Anything that
changes data is a POST that :meth:`Guard.authorize` lets through only when:

1. a token is configured (without one the dashboard is read-only: every such request
   answers 403);
2. it is not a cross-site request (``Sec-Fetch-Site`` other than ``same-origin``, or
   an ``Origin`` that is not the dashboard's own, is refused);
3. it carries the session cookie of a login with the token (HttpOnly, SameSite=Strict;
   sessions live in this process's memory and end after :data:`SESSION_SECONDS`);
4. its form's ``csrf`` field is the session's CSRF token.

Tokens are compared with :func:`hmac.compare_digest`. Every response carries headers
that forbid framing and any script, style or connection not from the dashboard itself
(:class:`SecurityHeaders`).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["SESSION_COOKIE", "SESSION_SECONDS", "MAX_FORM_BYTES", "Refused", "Session",
           "Guard", "Form", "read_form", "SecurityHeaders", "safe_next", "set_session_cookie",
           "clear_session_cookie"]

#: Name of the session cookie.
SESSION_COOKIE = "relaybus_session"
#: How long a login lasts, in seconds.
SESSION_SECONDS = 12 * 3600.0
#: Most sessions kept at once (the oldest go first).
MAX_SESSIONS = 1000
#: Largest form body accepted, in bytes.
MAX_FORM_BYTES = 64 * 1024
#: ``Sec-Fetch-Site`` values of a request the dashboard's own pages made.
_SAME_SITE = frozenset({"same-origin", "none"})

#: A parsed form: each field's values.
Form = dict[str, list[str]]


class Refused(Exception):
    """A request refused with ``status`` and a one-line reason shown to the user."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Session:
    """One login: its id (the cookie's value), CSRF token, end, and messages to show."""

    id: str
    csrf: str
    expires: float
    flash: list[str] = field(default_factory=list)

    def pop_flash(self) -> list[str]:
        """The messages waiting to be shown (once)."""
        shown, self.flash = self.flash, []
        return shown


class Guard:
    """The access rules of one dashboard: its token (None: read-only) and sessions."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @property
    def writable(self) -> bool:
        """True when a token is configured: logged-in users may change data."""
        return self._token is not None

    def check_token(self, given: str) -> bool:
        """Whether ``given`` is the token (constant-time comparison)."""
        return self._token is not None and hmac.compare_digest(given.encode(), self._token)

    def open_session(self) -> Session:
        """A new session (after a successful login)."""
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32),
                          time.monotonic() + SESSION_SECONDS)
        with self._lock:
            self._expire()
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[session.id] = session
        return session

    def session(self, request: Request) -> Session | None:
        """The live session ``request``'s cookie names, or None."""
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid or not self.writable:
            return None
        with self._lock:
            self._expire()
            return self._sessions.get(sid)

    def close_session(self, session: Session) -> None:
        """End ``session`` (log out)."""
        with self._lock:
            self._sessions.pop(session.id, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s.id for s in self._sessions.values() if s.expires <= now]:
            del self._sessions[sid]

    @staticmethod
    def cross_site(request: Request) -> bool:
        """True when a browser says ``request`` comes from another site: its
        ``Sec-Fetch-Site`` is not same-origin, or its ``Origin`` is not the dashboard's
        own (scheme, host and port). Clients that send neither (curl) pass."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site.lower() not in _SAME_SITE:
            return True
        origin = request.headers.get("origin")
        if origin is None:
            return False
        own = f"{request.url.scheme}://{request.url.netloc}"
        return origin.lower() != own.lower()  # "null" (a sandboxed or file page) too

    def refuse_cross_site(self, request: Request) -> None:
        """Raise :class:`Refused` (403) for a cross-site request."""
        if self.cross_site(request):
            raise Refused(403, "cross-site request refused: use the dashboard's own pages")

    async def authorize(self, request: Request) -> tuple[Session, Form]:
        """Check a request that changes data (see the module docstring); return its
        session and form, or raise :class:`Refused`."""
        if not self.writable:
            raise Refused(403, "this dashboard is read-only: no token is configured (start "
                          "it with --token or RELAYBUS_DASHBOARD_TOKEN to repair)")
        self.refuse_cross_site(request)
        session = self.session(request)
        if session is None:
            raise Refused(403, "log in with the dashboard's token first")
        form = await read_form(request)
        given = (form.get("csrf") or [""])[0]
        if not hmac.compare_digest(given.encode(), session.csrf.encode()):
            raise Refused(403, "the form's CSRF token does not match your session: reload "
                          "the page and try again")
        return session, form


async def read_form(request: Request) -> Form:
    """The request's URL-encoded form (at most :data:`MAX_FORM_BYTES`)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise Refused(415, "expected a form (application/x-www-form-urlencoded)")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_FORM_BYTES):
        raise Refused(413, "form too large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Refused(413, "form too large")
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True,
                    max_num_fields=2000)


def safe_next(target: str | None, default: str = "/") -> str:
    """``target`` if it is a path on this site (``/...``, not ``//host``), else ``default``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


#: Headers every response carries.
_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


class SecurityHeaders:
    """ASGI middleware adding the headers of :data:`_HEADERS` (and ``no-store`` on
    pages and JSON) to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers.setdefault(name, value)
                if not static:
                    headers.setdefault("cache-control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def set_session_cookie(response: Response, request: Request, session: Session) -> None:
    """Give the browser ``session``'s cookie (HttpOnly, SameSite=Strict; Secure on https)."""
    response.set_cookie(SESSION_COOKIE, session.id, max_age=int(SESSION_SECONDS), path="/",
                        httponly=True, samesite="strict", secure=request.url.scheme == "https")


def clear_session_cookie(response: Response) -> None:
    """Make the browser forget the session cookie."""
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")

